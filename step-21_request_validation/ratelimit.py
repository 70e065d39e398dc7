"""Rate limits: each caller gets a token bucket, and a call over it is refused with
RESOURCE_EXHAUSTED and the time to come back.

The Greeter keys its buckets by the authenticated user id (auth.py), the Logger by the
calling service (its client certificate, caller.py): never by the peer address, which
Envoy, a NAT or a shared client make the same for everyone. A call costs one token when it
starts; a chat, which may go on for ever, costs one more for each message after its first.

The buckets are throttled-py's GCRA: a token bucket of `burst` tokens refilled at `rate`
a second, computed from one timestamp per key (throttled-py's TOKEN_BUCKET refills in whole
seconds). With a Redis URL every replica shares them (the script runs in Redis, on Redis's
clock); while Redis is unreachable each replica limits on its own, in memory, and says so
once: the limit is then looser (a user may get `rate` from each replica), never gone, and
no call waits for Redis longer than REDIS_TIMEOUT_SECONDS. README, "How it works".
"""

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.descriptor import ServiceDescriptor
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from prometheus_client import CollectorRegistry, Counter, Gauge
from throttled.asyncio import RateLimiterType, Throttled, rate_limiter, store
from throttled.exceptions import StoreUnavailableError

from auth import Budget
from drain import until_the_client_stops_sending
from interceptors import OncePerMethod, wrap_handler

log = logging.getLogger("ratelimit")

# A Redis that does not answer in this long is treated as down for this call: a greeting
# never waits on it longer (a loaded Redis answers in milliseconds; a quarter of a second
# is an outage). While it is down, one call a second tries it again.
REDIS_TIMEOUT_SECONDS = 0.25
REDIS_RECHECK_SECONDS = 1.0
# Refusing a client stream waits for the client to stop sending (drain.py); at most this
# many such waits at once, as for callers without credentials (auth.py).
MAX_DRAINING_REFUSALS = 32


@dataclasses.dataclass(frozen=True)
class Quota:
    rate: int  # tokens a second
    burst: int  # tokens at most: the calls one may make at once after a pause


class Buckets:
    """A bucket per key: `wait(key)` takes a token and returns 0.0, or returns the seconds
    until the next one (taking nothing)."""

    def __init__(self, quota: Quota, redis_url: str | None, metrics: "LimiterMetrics"):
        gcra, per_second = RateLimiterType.GCRA.value, rate_limiter.per_sec(quota.rate, quota.burst)
        self._local = Throttled(using=gcra, quota=per_second, store=store.MemoryStore())
        self._shared = None
        if redis_url:
            timeouts = {
                "SOCKET_TIMEOUT": REDIS_TIMEOUT_SECONDS,
                "SOCKET_CONNECT_TIMEOUT": REDIS_TIMEOUT_SECONDS,
            }
            self._shared = Throttled(
                using=gcra,
                quota=per_second,
                store=store.RedisStore(server=redis_url, options=timeouts),
            )
        self._redis_url = redis_url
        self._metrics = metrics
        self._decided_in_redis = metrics.decisions.labels("redis")
        self._decided_in_memory = metrics.decisions.labels("memory")
        self._redis_down = False
        self._next_try = 0.0  # while Redis is down: when one call may try it again

    async def wait(self, key: str) -> float:
        if self._shared is not None and (not self._redis_down or self._may_try_redis()):
            try:
                result = await self._shared.limit(key)
            except StoreUnavailableError as error:
                self._went_down(error)
            else:
                self._came_back()
                self._decided_in_redis.inc()
                return result.state.retry_after if result.limited else 0.0
        result = await self._local.limit(key)
        self._decided_in_memory.inc()
        return result.state.retry_after if result.limited else 0.0

    def _may_try_redis(self) -> bool:
        now = time.monotonic()
        if now < self._next_try:
            return False
        self._next_try = now + REDIS_RECHECK_SECONDS  # the others stay local meanwhile
        return True

    def _went_down(self, error: StoreUnavailableError) -> None:
        self._next_try = time.monotonic() + REDIS_RECHECK_SECONDS
        if self._redis_down:
            return
        self._redis_down = True
        self._metrics.store_up.set(0)
        log.warning(
            "rate limits: Redis at %s is unreachable (%s): each replica limits on its own "
            "until it is back",
            self._redis_url,
            error.__cause__ or error,
        )

    def _came_back(self) -> None:
        if self._redis_down:
            self._redis_down = False
            self._metrics.store_up.set(1)
            log.warning(
                "rate limits: Redis at %s is back: limits are shared again", self._redis_url
            )


class LimiterMetrics:
    """What the limits did: the calls refused (by method and limit, never by caller: user
    ids are unbounded), where the buckets were, and whether Redis answers (only when the
    buckets are shared). The same names in the Greeter and the Logger: the `job` label of
    Prometheus's scrape tells them apart."""

    def __init__(
        self,
        registry: CollectorRegistry,
        limit: str,
        services: Iterable[ServiceDescriptor],
        exempt: frozenset[str] = frozenset(),
        shared: bool = False,
    ):
        self.limited = Counter(
            "ratelimit_refused_total",
            "Calls refused with RESOURCE_EXHAUSTED by a rate limit, by method and limit.",
            ["grpc_service", "grpc_method", "limit"],
            registry=registry,
        )
        self.decisions = Counter(
            "ratelimit_decisions_total",
            "Tokens asked for, by where the bucket was: redis (shared) or memory (this replica).",
            ["store"],
            registry=registry,
        )
        for service in services:  # every series at 0 from the start, as metrics.py does
            for method in service.methods:
                if f"{service.full_name}/{method.name}" not in exempt:
                    self.limited.labels(service.full_name, method.name, limit)
        for where in ("redis", "memory"):
            self.decisions.labels(where)
        self.store_up = Gauge(
            "ratelimit_store_up",
            "1 while the shared store (Redis) answers; 0 while each replica limits on its own.",
            registry=registry,
        )
        self.store_up.set(1 if shared else 0)
        if not shared:  # no Redis configured: no such series (an alert on 0 would fire)
            registry.unregister(self.store_up)


def throttled_status(subject: str, quota: Quota, retry_after: float) -> status_pb2.Status:
    """RESOURCE_EXHAUSTED with google.rpc.RetryInfo (when to come back) and QuotaFailure
    (which quota), the details https://google.aip.dev/193 asks for."""
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(max(1_000_000, round(retry_after * 1e9)))  # at least 1 ms
    retry_info, quota_failure = any_pb2.Any(), any_pb2.Any()
    retry_info.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    limit = f"{quota.rate} call{'s' if quota.rate > 1 else ''} a second, {quota.burst} at once"
    quota_failure.Pack(
        error_details_pb2.QuotaFailure(
            violations=[
                error_details_pb2.QuotaFailure.Violation(subject=subject, description=limit)
            ]
        )
    )
    return status_pb2.Status(
        code=code_pb2.RESOURCE_EXHAUSTED,
        message=f"rate limit of {subject} ({limit}): retry in {retry_after:.2f} s",
        details=[retry_info, quota_failure],
    )


def retry_after_header(status: status_pb2.Status) -> tuple[str, str]:
    """HTTP's Retry-After for the RetryInfo in `status`, in whole seconds rounded up. Envoy's
    JSON transcoder passes a call's metadata on as headers (step 19), so REST callers read
    when to come back where HTTP says, as gRPC callers read RetryInfo."""
    info = error_details_pb2.RetryInfo()
    for detail in status.details:
        if detail.Unpack(info):
            return ("retry-after", str(math.ceil(info.retry_delay.ToNanoseconds() / 1e9)))
    raise ValueError("no RetryInfo in the status")


class ServerRateLimiter(grpc.aio.ServerInterceptor):
    """Refuses a caller's calls beyond its quota. `subject_of(context)` names the caller
    ("user ada"), or None for a call no limit applies to; calls to the `exempt` services
    services (health, reflection) or methods ("logger.v1.Logger/ListRecent") are never
    limited. Sits after the auth interceptor, so a caller
    without credentials is refused before it could take anyone's tokens."""

    def __init__(
        self,
        quota: Quota,
        subject_of: Callable[[grpc.aio.ServicerContext], str | None],
        limit: str,
        metrics: LimiterMetrics,
        redis_url: str | None = None,
        exempt: frozenset[str] = frozenset(),
    ):
        self._quota = quota
        self._subject_of = subject_of
        self._limit = limit
        self._metrics = metrics
        self._buckets = Buckets(quota, redis_url, metrics)
        self._exempt = exempt
        self._draining = Budget(MAX_DRAINING_REFUSALS)
        self._wrapped = OncePerMethod(self._wrap)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        _, service, method = handler_call_details.method.split("/")
        if handler is None or service in self._exempt or f"{service}/{method}" in self._exempt:
            return handler
        return self._wrapped(handler_call_details.method, handler)

    async def _refusal(self, context, refused: Counter) -> status_pb2.Status | None:
        """None when the call may go on (a token taken); otherwise the status it ends with."""
        subject = self._subject_of(context)
        if subject is None or not (wait := await self._buckets.wait(subject)):
            return None
        refused.inc()
        return throttled_status(subject, self._quota, wait)

    async def _refuse(self, request_or_iterator, context, status, request_streaming: bool):
        if request_streaming:
            # As auth.py does: let the client finish writing first (grpc/grpc#36066).
            with self._draining.slot() as granted:
                if granted:
                    await until_the_client_stops_sending(request_or_iterator)
        refusal = rpc_status.to_status(status)
        metadata = (*refusal.trailing_metadata, retry_after_header(status))
        await context.abort(refusal.code, refusal.details, metadata)

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        _, service, name = method.split("/")
        refused = self._metrics.limited.labels(service, name, self._limit)
        streaming_requests = handler.request_streaming

        async def metered(requests, context):
            """A chat's messages, each after the first taking a token."""
            first = True
            async for request in requests:
                if not first and (status := await self._refusal(context, refused)):
                    await self._refuse(requests, context, status, streaming_requests)
                first = False
                yield request

        def wrap(behaviour, response_streaming: bool):
            async def unary(request_or_iterator, context):
                if status := await self._refusal(context, refused):
                    await self._refuse(request_or_iterator, context, status, streaming_requests)
                return await behaviour(request_or_iterator, context)

            async def stream(request_or_iterator, context):
                if status := await self._refusal(context, refused):
                    await self._refuse(request_or_iterator, context, status, streaming_requests)
                if streaming_requests:
                    request_or_iterator = metered(request_or_iterator, context)
                async with contextlib.aclosing(behaviour(request_or_iterator, context)) as replies:
                    async for reply in replies:
                        yield reply

            return stream if response_streaming else unary

        return wrap_handler(handler, wrap)
