"""The Logger's consumer of the Greeter's events: it reads topic events.greeted in the consumer
group `logger` and counts greetings per user.

Each event is processed once, however often it is delivered: the publisher sends again what
the broker did not acknowledge in time, and a consumer that stopped between processing and
committing reads again from its last commit. The consumer remembers the ids of the events it
processed (bounded, the oldest forgotten first) and skips a repeat. Offsets are committed
after processing, never before: a crash repeats work, it never loses any. Each event's span
continues the greeting's trace from the message headers.
(step 16's README, "Two paths: the audit record and the events".)
"""

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from google.protobuf.message import DecodeError
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry, Counter, Gauge

from events.v1 import events_pb2
from outbox import TOPIC, BrokerOutage, one_line_per_outage, reason  # TOPIC: named once

log = logging.getLogger("logger.events")

GROUP = "logger"
# How long the consumer waits for new events at a time, and between two tries while the
# broker is away.
POLL_MILLISECONDS = 200
RETRY_SECONDS = 0.5
STOP_SECONDS = 10.0  # for the last batch and its commit, on shutdown
LEAVE_SECONDS = 2.0  # for a consumer to leave, when the broker it would tell is away
PARTITIONS_CHECK_SECONDS = 10.0  # how often an "all" consumer looks for new partitions


class GreetingCounts:
    """Greetings per user, from GreetedEvents, each event counted once."""

    def __init__(self, remembered: int, registry: CollectorRegistry, provider: TracerProvider):
        self.by_user: collections.Counter[str] = collections.Counter()
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._remembered = remembered
        self._tracer = provider.get_tracer("logger.events")
        self._processed = Counter(
            "logger_events_processed_total",
            "GreetedEvents counted, each event id once.",
            registry=registry,
        )
        self._repeats = Counter(
            "logger_events_repeated_total",
            "GreetedEvents delivered again after they were counted, and skipped.",
            registry=registry,
        )
        self._unreadable = Counter(
            "logger_events_unreadable_total",
            "Messages on the topic that are not a GreetedEvent, skipped.",
            registry=registry,
        )
        self.lag = Gauge(
            "logger_events_lag",
            "Events on the topic the consumer has not read yet, all partitions added up.",
            registry=registry,
        )

    def process(self, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        carrier = {name: data.decode(errors="replace") for name, data in headers or ()}
        with self._tracer.start_as_current_span(
            f"{TOPIC} process",
            context=propagate.extract(carrier),  # the greeting's trace goes on here
            kind=trace.SpanKind.CONSUMER,
            attributes={"messaging.system": "kafka", "messaging.destination.name": TOPIC},
        ) as span:
            try:
                event = events_pb2.GreetedEvent.FromString(value)
            except DecodeError:
                self._unreadable.inc()
                span.set_status(trace.StatusCode.ERROR, "not a GreetedEvent")
                log.warning("skipped a message that is not a GreetedEvent (key=%r)", key)
                return
            span.set_attribute("messaging.message.id", event.event_id)
            if event.event_id in self._seen:
                self._repeats.inc()
                return
            self._seen[event.event_id] = None
            if len(self._seen) > self._remembered:
                self._seen.popitem(last=False)
            self.by_user[event.user_id] += 1
            self._processed.inc()

    @property
    def total(self) -> int:
        return sum(self.by_user.values())


async def fetch_unless_stopped(consumer: AIOKafkaConsumer, stop: asyncio.Event) -> dict | None:
    """The next batch, or None as soon as `stop` is set: a shutdown does not wait for the
    poll. Nothing of an abandoned fetch was counted, and the next consumer reads it again."""
    fetch = asyncio.ensure_future(consumer.getmany(timeout_ms=POLL_MILLISECONDS))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({fetch, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not fetch.done():
        fetch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await fetch
        return None
    return fetch.result()


async def consume(
    consumer: AIOKafkaConsumer,
    counts: GreetingCounts,
    stop: asyncio.Event,
    outage: BrokerOutage,
    for_seconds: float = float("inf"),
) -> None:
    """Read, count, commit, until `stop` is set (or `for_seconds` have passed): it ends
    between two batches, so what was counted has been committed."""
    ends = time.monotonic() + for_seconds
    while not stop.is_set() and time.monotonic() < ends:
        if (batches := await fetch_unless_stopped(consumer, stop)) is None:
            return
        if batches and (away := outage.back()) is not None:
            log.info("events are read again after %.1f s", away)
        for partition, records in batches.items():
            for record in records:
                counts.process(record.key, record.value, record.headers)
            if records:
                # After processing: a stop before this line reads the batch again (and the
                # event ids skip the repeats), a stop after it never does.
                await consumer.commit({partition: records[-1].offset + 1})
        lag = 0
        for partition in consumer.assignment():
            lag += max((consumer.highwater(partition) or 0) - await consumer.position(partition), 0)
        counts.lag.set(lag)


async def assign_every_partition(
    consumer: AIOKafkaConsumer, bootstrap: str, stop: asyncio.Event
) -> None:
    """Read every partition of the topic as this one consumer, without joining the group's
    rebalancing (offsets are still the group's): starts at once, where a group join takes
    seconds. Waits for the topic to exist (its first event creates it)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        while not stop.is_set():
            [topic] = await admin.describe_topics([TOPIC])
            # A topic the broker does not have (yet) comes with an error code and no
            # partitions; one it has, with every partition.
            if topic["partitions"]:
                partitions = sorted(p["partition"] for p in topic["partitions"])
                consumer.assign([TopicPartition(TOPIC, p) for p in partitions])
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RETRY_SECONDS)  # then ask again
    finally:
        await admin.close()


async def keep_consuming(
    bootstrap: str,
    assignment: str,
    counts: GreetingCounts,
    stop: asyncio.Event,
    outage: BrokerOutage,
) -> None:
    """Connect (again, while the broker is away) and consume, until `stop` is set;
    `assignment` "group" joins the consumer group, "all" reads every partition
    (assign_every_partition)."""
    while not stop.is_set():
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=GROUP,
            enable_auto_commit=False,  # committed by `consume`, after processing
            auto_offset_reset="earliest",  # a new group starts at the first event
        )
        try:
            await consumer.start()
            if assignment == "group":
                consumer.subscribe([TOPIC])  # Kafka assigns partitions, new ones too
                await consume(consumer, counts, stop, outage)
            while assignment == "all" and not stop.is_set():
                # Every partition, looked up again now and then: a topic may gain some.
                await assign_every_partition(consumer, bootstrap, stop)
                await consume(consumer, counts, stop, outage, for_seconds=PARTITIONS_CHECK_SECONDS)
        except (KafkaError, OSError) as err:
            outage.went(reason(err))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RETRY_SECONDS)  # the retry's pace
        finally:
            # Bounded: with the broker away, leaving could wait for its request timeouts.
            with contextlib.suppress(KafkaError, OSError, TimeoutError):
                async with asyncio.timeout(LEAVE_SECONDS):
                    await consumer.stop()


@contextlib.asynccontextmanager
async def counting_greetings(
    bootstrap: str,
    assignment: str,
    remembered: int,
    registry: CollectorRegistry,
    provider: TracerProvider,
) -> AsyncIterator[GreetingCounts]:
    """GreetingCounts kept up to date from the topic for the block."""
    counts = GreetingCounts(remembered, registry, provider)
    stop = asyncio.Event()
    with one_line_per_outage(log, "events are not read") as outage:
        task = asyncio.create_task(keep_consuming(bootstrap, assignment, counts, stop, outage))
        try:
            yield counts
        finally:
            stop.set()  # the batch being counted is committed, then the consumer leaves
            try:
                await asyncio.wait_for(task, STOP_SECONDS)
            except TimeoutError:
                log.warning("the events consumer did not stop within %.0f s", STOP_SECONDS)
            log.info("events: %d counted since start", counts.total)
