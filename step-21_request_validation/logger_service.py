"""The Logger service: stores the greetings services report, in a bounded in-memory log,
and lists the most recent ones.

Kept in memory on purpose: the step is about a second service and the calls between them,
not storage. When the log is full the oldest entries go first; a real audit log would write
to a database (see the README).
"""

import asyncio
import collections

from google.protobuf.timestamp_pb2 import Timestamp

from caller import calling_service, current_user_id
from interceptors import current_trace_id
from logger.v1 import logger_pb2, logger_pb2_grpc
from propagation import current_request_id
from service import MAX_CHAT_MESSAGES, MAX_GREET_MANY_NAMES

# The most names one greeting holds: a whole chat, or a whole GreetMany call (the rule
# names.count in protos/logger/v1/logger.proto says the same).
MAX_NAMES = max(MAX_CHAT_MESSAGES, MAX_GREET_MANY_NAMES)
DEFAULT_LIST_LIMIT = 20
MAX_LIST_LIMIT = 100  # the rule limit.max says the same
# The largest Record a real caller sends: MAX_NAMES names of 100 characters, each
# character up to 4 bytes of UTF-8, plus the other fields. Bigger is refused unread.
MAX_RECORD_BYTES = 64 * 1024
# A ListRecent reply of 100 such entries is bigger than that: it may be up to this size.
MAX_REPLY_BYTES = MAX_LIST_LIMIT * MAX_RECORD_BYTES


class GreetingLogService(logger_pb2_grpc.LoggerServicer):
    def __init__(self, max_entries: int):
        # The newest `max_entries` entries; appending to a full deque drops the oldest.
        self.entries: collections.deque[logger_pb2.Entry] = collections.deque(maxlen=max_entries)
        self.recorded = 0  # entries ever recorded: the next entry's sequence number - 1
        # The sequence number of each request id recorded, the newest `max_entries` of them:
        # a Record retried (by gRPC, or by the Greeter) is stored once (README, "How it works").
        self.sequence_of: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.max_entries = max_entries
        # Set when the server begins to shut down (serving.stop_gracefully).
        self.shutting_down = asyncio.Event()

    async def Record(self, request, context):
        request_id = current_request_id()
        assert request_id is not None  # every call has one (request_ids.py)
        if (sequence := self.sequence_of.get(request_id)) is not None:
            return logger_pb2.RecordReply(sequence=sequence)  # a retry: stored already
        self.recorded += 1
        self.sequence_of[request_id] = self.recorded
        if len(self.sequence_of) > self.max_entries:
            self.sequence_of.popitem(last=False)
        recorded_at = Timestamp()
        recorded_at.GetCurrentTime()
        self.entries.append(
            logger_pb2.Entry(
                sequence=self.recorded,
                greeting=request.greeting,
                recorded_by=calling_service(context) or "",  # mutual TLS only
                recorded_at=recorded_at,
                trace_id=current_trace_id() or "",
                # From the call's metadata: the request id (propagation.py), and the user the
                # auth interceptor checked, believed because the caller holds the Logger's
                # token. See step 11's README, "Who may set x-user-id, and why the Logger believes it".
                user_id=current_user_id(),
                request_id=request_id,
            )
        )
        return logger_pb2.RecordReply(sequence=self.recorded)

    async def ListRecent(self, request, context):
        limit = request.limit or DEFAULT_LIST_LIMIT  # at most 100: the rule (limit.max)
        newest_first = reversed(self.entries)
        return logger_pb2.ListRecentReply(
            entries=[entry for _, entry in zip(range(limit), newest_first, strict=False)]
        )
