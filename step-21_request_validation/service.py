"""The Greeter service: what each RPC does and which input it accepts. Each greeting is
reported to the Logger (logger_client.py): SayHello's before its reply, a stream's and a
chat's once, when they end, with every name they greeted."""

import asyncio
import logging

import grpc

from drain import refuse_stream
from greeter.v1 import greeter_pb2, greeter_pb2_grpc
from interceptors import status_of
from logger_client import GreetingLog
from outbox import EventPublisher

# The rules of a request are in the protos (buf.validate, step 21's README): a name has 1 to
# 100 characters (names/v1/names.proto), a stream 1 to 10 replies (count.range). These are
# the same figures, for the tests' boundaries; 0 (unset) asks for the default.
MAX_NAME_LENGTH = 100
DEFAULT_STREAM_COUNT = 5
MAX_STREAM_COUNT = 10
# A chat is bounded as well: a client that needs more starts a new one.
MAX_CHAT_MESSAGES = 100
# So are the names one GreetMany call may send.
MAX_GREET_MANY_NAMES = 100

log = logging.getLogger("greeter.service")

# How a call stopped before its end is logged, by the status it ended with.
STOPPED_BY = {
    grpc.StatusCode.DEADLINE_EXCEEDED: "ended by its deadline",
    grpc.StatusCode.UNAVAILABLE: "cut by the server's shutdown",
}

log = logging.getLogger("greeter.service")


def listed(names: list[str]) -> str:
    """The names as a sentence says them: Ada; Ada and Grace; Ada, Grace and Alan."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


class Greeter(greeter_pb2_grpc.GreeterServicer):
    def __init__(
        self, greeting_log: GreetingLog, events: EventPublisher, stream_interval: float = 0.5
    ):
        self.greeting_log, self.events = greeting_log, events
        self.stream_interval = stream_interval  # seconds between two streamed replies
        # Set when the server begins to shut down: a stream cancelled from then on was cut by
        # the server (its grace period ran out), not by the client.
        self.shutting_down = asyncio.Event()

    async def greeted(self, names: list[str], method: str) -> None:
        """A greeting was made: its event goes to the outbox (no wait), its audit entry to
        the Logger (step 16's README, "Two paths: the audit record and the events")."""
        self.events.publish(names, method)
        await self.greeting_log.record(names, method)

    async def SayHello(self, request, context):
        # The request follows its rules: the validation interceptor checked it (validation.py).
        await self.greeted([request.name], "SayHello")
        return greeter_pb2.HelloReply(message=f"Hello, {request.name}!")

    async def StreamGreetings(self, request, context):
        count = request.count or DEFAULT_STREAM_COUNT
        sent, greeted = 0, False
        try:
            for number in range(1, count + 1):
                if number > 1:
                    await asyncio.sleep(self.stream_interval)
                # Greeted, and counted, once a reply is handed to gRPC: a cancel may reach
                # the call while it is sent, and the greeting was still made.
                greeted, sent = True, number
                yield greeter_pb2.HelloReply(message=f"Hello, {request.name}! ({number}/{count})")
        except (asyncio.CancelledError, GeneratorExit):
            # grpc.aio cancels this task the moment the client cancels or disconnects, the
            # deadline passes or the server's grace period runs out, so the loop stops at
            # once: no reply is produced for a client that is gone. A cancel that comes while
            # grpc.aio is sending a reply leaves this generator at its `yield`, and Python
            # closes it there later: GeneratorExit, the same ending.
            log.info("StreamGreetings %s after %d of %d replies", self.ended(context), sent, count)
            raise
        finally:
            if greeted:  # however the stream ended
                await self.greeted([request.name], "StreamGreetings")

    async def GreetMany(self, request_iterator, context):
        # Each name was checked as it arrived (validation.py); one too many ends the call
        # once the client stops sending (without keeping what it sends meanwhile). The one
        # reply waits for the half-close.
        names: list[str] = []
        async for request in request_iterator:
            if len(names) == MAX_GREET_MANY_NAMES:
                await refuse_stream(
                    request_iterator,
                    context,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"GreetMany takes at most {MAX_GREET_MANY_NAMES} names; "
                    "greet the others in another call",
                )
            names.append(request.name)
        # grpc.aio ends the stream the same way when the client half-closes, cancels or runs
        # out of time, and when the server stops. The last two can be told apart here, and
        # nobody waits for a reply then: the client already has its status.
        if (reason := self.cut_short(context)) is not None:
            log.info("GreetMany %s; names read: %d", reason, len(names))
            raise asyncio.CancelledError
        if not names:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "GreetMany needs at least one name; send one or more before closing the stream",
            )
        # A client that cancelled gets here too, as if it had half-closed: gRPC drops the
        # reply (step 03's README, "How it works"). Greeted all the same, as a stream's reply
        # handed to gRPC is: one entry with every name.
        await self.greeted(names, "GreetMany")
        return greeter_pb2.HelloReply(message=f"Hello, {listed(names)}!")

    async def Chat(self, request_iterator, context):
        # One reply per message, the moment it arrives: the loop never waits for the
        # client to finish sending. It ends when the client half-closes.
        received, greeted = 0, []
        try:
            async for request in request_iterator:
                received += 1
                if received > MAX_CHAT_MESSAGES:
                    await context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"a chat holds at most {MAX_CHAT_MESSAGES} messages; start a new chat",
                    )
                greeted.append(request.name)  # before the yield, as in StreamGreetings
                yield greeter_pb2.HelloReply(message=f"Hello, {request.name}!")
        finally:
            # However the chat ends: half-close, error, cancellation, or a client whose
            # connection dropped (grpc.aio ends the request iterator then, as on a half-close,
            # so the handler returns at once and nothing of the chat stays behind).
            log.info("Chat ended after %d messages", received)
            if greeted:
                await self.greeted(greeted, "Chat")

    def ended(self, context) -> str:
        """Why a call was stopped before its end, as its log line says it."""
        return self.cut_short(context) or "cancelled by the client"

    def cut_short(self, context) -> str | None:
        """Whether the deadline or the server's shutdown is stopping the call, as its log
        line says it (by the rule its status is recorded with, `status_of`); None when
        neither is."""
        code = status_of(context, asyncio.CancelledError(), self.shutting_down)
        return STOPPED_BY.get(code)
