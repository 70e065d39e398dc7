"""The Greeter's events: after each greeting, a GreetedEvent for Kafka (topic events.greeted),
and the greeting never waits for the broker.

`EventPublisher.publish` puts the event in a bounded in-memory **outbox** and returns at
once. A background task sends the outbox to the broker, oldest first, in batches, and takes
an event out only once the broker has acknowledged it (acks=all). While the broker
is down, events wait in the outbox and the task keeps trying; when the outbox is full, a new
event is dropped and counted, never silently. On shutdown the outbox gets the grace period
to drain. (step 16's README, "Two paths: the audit record and the events".)
"""

import asyncio
import collections
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from opentelemetry import propagate
from prometheus_client import CollectorRegistry, Counter, Gauge

from caller import current_user_id
from events.v1 import events_pb2
from propagation import current_request_id

log = logging.getLogger("greeter.events")

TOPIC = "events.greeted"
# How long one attempt to send an event may take, and the pauses between attempts while the
# broker is away (doubling from the first to the last).
SEND_TIMEOUT_SECONDS = 5.0
MAX_BATCH = 500  # events sent at once
RETRY_BACKOFF_SECONDS = (0.05, 1.0)


class BrokerOutage(logging.Handler):
    """One line when the broker goes away, saying why, and one when it is back.

    aiokafka logs each failed reconnect, tens of lines a second while the broker is away.
    Installed on its loggers (`one_line_per_outage`), this handler turns the first warning
    or error of an outage into one line of `log` and drops the rest until `back()`; the
    code that talks to the broker calls `went()` on its own errors too, and `back()` once
    events flow again. aiokafka's INFO lines (a group joined...) pass on unchanged.
    """

    def __init__(self, log: logging.Logger, what: str):
        super().__init__()
        self.log, self.what = log, what
        self.away_since: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            self.went(record.getMessage())
        else:
            logging.getLogger().handle(record)  # where it would have gone

    def went(self, reason: str) -> None:
        """The broker cannot be reached: one line, the first time in an outage."""
        if self.away_since is None:
            self.away_since = time.monotonic()
            self.log.warning("%s: the broker: %s", self.what, reason)

    def back(self) -> float | None:
        """Events flow again: how long the broker was away, or None if it was not."""
        if self.away_since is None:
            return None
        away, self.away_since = time.monotonic() - self.away_since, None
        return away


@contextlib.contextmanager
def one_line_per_outage(log: logging.Logger, what: str) -> Iterator[BrokerOutage]:
    """A BrokerOutage on aiokafka's loggers for the block."""
    outage = BrokerOutage(log, what)
    kafka_log = logging.getLogger("aiokafka")
    kafka_log.addHandler(outage)
    kafka_log.propagate = False  # its lines go through `outage` only
    try:
        yield outage
    finally:
        kafka_log.removeHandler(outage)
        kafka_log.propagate = not kafka_log.handlers


def reason(error: BaseException) -> str:
    """What went wrong, also for the errors whose message is empty."""
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def retry_pauses() -> Iterator[float]:
    """The pauses between two tries while the broker is away: doubling from the first of
    RETRY_BACKOFF_SECONDS to the last, then the last."""
    pause = RETRY_BACKOFF_SECONDS[0]
    while True:
        yield pause
        pause = min(pause * 2, RETRY_BACKOFF_SECONDS[1])


class EventPublisher:
    """Publishes GreetedEvents through a bounded outbox (see the module's docstring)."""

    def __init__(
        self,
        bootstrap_servers: str,
        capacity: int,
        registry: CollectorRegistry,
        outage: BrokerOutage,
    ):
        self._bootstrap = bootstrap_servers
        self._outage = outage
        self._capacity = capacity
        # (key, value, headers) in the order the greetings happened.
        self._outbox: collections.deque[tuple[bytes, bytes, list]] = collections.deque()
        self._waiting = asyncio.Event()  # set while the outbox holds events
        self._empty = asyncio.Event()  # set while it holds none
        self._empty.set()
        self._published = Counter(
            "greeter_events_published_total",
            "GreetedEvents the broker acknowledged.",
            registry=registry,
        )
        self._dropped = Counter(
            "greeter_events_dropped_total",
            "GreetedEvents never published: the outbox was full, or still held them at the "
            "end of the shutdown grace period.",
            ["reason"],
            registry=registry,
        )
        for reason in ("outbox_full", "shutdown"):
            self._dropped.labels(reason)
        Gauge(
            "greeter_events_outbox",
            "GreetedEvents accepted and not yet acknowledged by the broker.",
            registry=registry,
        ).set_function(lambda: len(self._outbox))

    def publish(self, names: Sequence[str], method: str) -> None:
        """Accept the event of a greeting by the current caller, or drop and count it when
        the outbox is full. Never blocks, never raises."""
        if len(self._outbox) >= self._capacity:
            self._dropped.labels("outbox_full").inc()
            log.warning(
                "%s event dropped (request_id=%s): the outbox is full", method, current_request_id()
            )
            return
        user_id = current_user_id() or ""
        event = events_pb2.GreetedEvent(
            event_id=uuid.uuid4().hex, user_id=user_id, names=names, method=method
        )
        event.greeted_at.GetCurrentTime()
        headers: dict[str, str] = {}
        propagate.inject(headers)  # traceparent: the consumer continues the greeting's trace
        if request_id := current_request_id():
            headers["x-request-id"] = request_id
        kafka_headers = [(name, value.encode()) for name, value in headers.items()]
        self._outbox.append((user_id.encode(), event.SerializeToString(), kafka_headers))
        self._empty.clear()
        self._waiting.set()

    async def deliver(self) -> None:
        """Send the outbox to the broker for as long as the task runs: connecting (again)
        while the broker is away, taking an event out only once it was acknowledged."""
        pauses = retry_pauses()
        producer: AIOKafkaProducer | None = None
        try:
            while True:
                await self._waiting.wait()
                try:
                    async with asyncio.timeout(SEND_TIMEOUT_SECONDS):
                        if producer is None:
                            producer = AIOKafkaProducer(
                                bootstrap_servers=self._bootstrap,
                                acks="all",
                                request_timeout_ms=int(SEND_TIMEOUT_SECONDS * 1000),
                            )
                            await producer.start()
                        # The oldest events, sent together: the producer puts them in one
                        # request per partition, and each resolves when it is acknowledged.
                        batch = list(itertools.islice(self._outbox, MAX_BATCH))
                        acknowledged = [
                            await producer.send(TOPIC, value, key=key, headers=headers)
                            for key, value, headers in batch
                        ]
                        await asyncio.gather(*acknowledged)
                except (KafkaError, OSError, TimeoutError) as err:
                    self._outage.went(reason(err))
                    if producer is not None:
                        await stop_quietly(producer)
                        producer = None
                    await asyncio.sleep(next(pauses))  # the retry's pace, not synchronisation
                    continue
                pauses = retry_pauses()  # the next outage starts from the first pause again
                for _ in batch:  # only this task takes events out: these are the batch
                    self._outbox.popleft()
                self._published.inc(len(batch))
                if (away := self._outage.back()) is not None:
                    log.info(
                        "the broker takes events again after %.1f s; %d wait in the outbox",
                        away,
                        len(self._outbox),
                    )
                if not self._outbox:
                    self._waiting.clear()
                    self._empty.set()
        finally:
            if producer is not None:
                await stop_quietly(producer)

    async def drain(self, grace: float) -> None:
        """Wait up to `grace` seconds for the outbox to empty; count what is left as lost."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._empty.wait(), grace)
        if self._outbox:
            self._dropped.labels("shutdown").inc(len(self._outbox))
            log.error(
                "%d events not published: the broker did not take them within the %.1f s grace period",
                len(self._outbox),
                grace,
            )


async def stop_quietly(producer: AIOKafkaProducer) -> None:
    with contextlib.suppress(KafkaError, OSError, TimeoutError):
        async with asyncio.timeout(SEND_TIMEOUT_SECONDS):
            await producer.stop()


@contextlib.asynccontextmanager
async def publishing_events(
    bootstrap_servers: str, capacity: int, grace: float, registry: CollectorRegistry
) -> AsyncIterator[EventPublisher]:
    """An EventPublisher whose outbox is delivered for the block, then drained within `grace`
    seconds (the server has stopped by then: no new event can come)."""
    with one_line_per_outage(log, "events wait in the outbox") as outage:
        publisher = EventPublisher(bootstrap_servers, capacity, registry, outage)
        delivering = asyncio.create_task(publisher.deliver())
        try:
            yield publisher
        finally:
            await publisher.drain(grace)
            delivering.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await delivering
