import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GreetedEvent(_message.Message):
    __slots__ = ("event_id", "user_id", "names", "method", "greeted_at")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    GREETED_AT_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    user_id: str
    names: _containers.RepeatedScalarFieldContainer[str]
    method: str
    greeted_at: _timestamp_pb2.Timestamp
    def __init__(self, event_id: _Optional[str] = ..., user_id: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ..., method: _Optional[str] = ..., greeted_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
