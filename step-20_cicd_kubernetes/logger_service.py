"""The Logger service: stores the greetings services report, in a bounded in-memory log,
and lists the most recent ones.

Kept in memory on purpose: the step is about a second service and the calls between them,
not storage. When the log is full the oldest entries go first; a real audit log would write
to a database (see the README).
"""

import asyncio
import collections

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from caller import calling_service, current_user_id
from interceptors import current_trace_id
from logger.v1 import logger_pb2, logger_pb2_grpc
from propagation import current_request_id
from service import MAX_CHAT_MESSAGES, MAX_GREET_MANY_NAMES, name_problem

MAX_METHOD_LENGTH = 64
# The most names one greeting holds: a whole chat, or a whole GreetMany call.
MAX_NAMES = max(MAX_CHAT_MESSAGES, MAX_GREET_MANY_NAMES)
DEFAULT_LIST_LIMIT = 20
MAX_LIST_LIMIT = 100
# The largest Record a real caller sends: MAX_NAMES names of 100 characters, each
# character up to 4 bytes of UTF-8, plus the other fields. Bigger is refused unread.
MAX_RECORD_BYTES = 64 * 1024
# A ListRecent reply of 100 such entries is bigger than that: it may be up to this size.
MAX_REPLY_BYTES = MAX_LIST_LIMIT * MAX_RECORD_BYTES


def greeting_problem(greeting: logger_pb2.Greeting) -> str | None:
    """Why `greeting` cannot be stored, in words a caller understands; None when it can."""
    if not 1 <= len(greeting.names) <= MAX_NAMES:
        return f"names must hold 1 to {MAX_NAMES} names (got {len(greeting.names)})"
    for name in greeting.names:
        if problem := name_problem(name):
            return f"names: {problem}"
    method = greeting.method
    if not method or len(method) > MAX_METHOD_LENGTH or not method.isidentifier():
        return f"method must be an RPC name such as SayHello (1 to {MAX_METHOD_LENGTH} characters)"
    if not greeting.HasField("greeted_at"):
        return "greeted_at must be set"
    return None


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
        if problem := greeting_problem(request.greeting):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
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
        limit = request.limit or DEFAULT_LIST_LIMIT
        if limit > MAX_LIST_LIMIT:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"limit must be at most {MAX_LIST_LIMIT} (got {limit}); 0 means {DEFAULT_LIST_LIMIT}",
            )
        newest_first = reversed(self.entries)
        return logger_pb2.ListRecentReply(
            entries=[entry for _, entry in zip(range(limit), newest_first, strict=False)]
        )
