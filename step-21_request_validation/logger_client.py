"""The Greeter's side of the Logger: one channel, opened when the server starts and reused by
every call, and `GreetingLog.record`, which reports a greeting and never fails the greeting.

The log entry is a side effect; the greeting is the product. So a call to the Logger has a
deadline (GREETER_LOGGER_TIMEOUT), and when it fails (the Logger is down, slow, or refuses
the call) the Greeter logs one WARNING, counts it in greeter_unlogged_greetings_total, and
answers its caller as if nothing happened. step 10's README, "When the Logger is slow or down".
When the Logger keeps failing, a circuit breaker stops calling it for a while (breaker.py).
"""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

import grpc
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry, Counter

from auth import client_auth_interceptors
from balancing import channel_options
from breaker import LoggerBreaker, LoggerSkipped
from logger.v1 import logger_pb2, logger_pb2_grpc
from metrics import GO_CODE_NAMES, ClientMetrics
from propagation import current_request_id, propagating_interceptors, seconds_left
from retries import DEADLINE_MARGIN_SECONDS, LOGGER_RETRIED, REPORT_ATTEMPTS, report_attempts
from settings import Settings
from tls import TlsConfigError, channel_credentials
from tracing import ClientTracer

log = logging.getLogger("greeter.logger_client")


class GreetingLog:
    """Reports greetings to the Logger through one shared stub."""

    def __init__(
        self,
        stub: "logger_pb2_grpc.LoggerAsyncStub",
        timeout: float,
        unlogged: Counter,
        breaker: LoggerBreaker,
        retries: Counter,
    ):
        self._stub, self._timeout, self._unlogged = stub, timeout, unlogged
        self.breaker, self._retries = breaker, retries
        self._in_flight: set[asyncio.Task] = set()

    async def record(self, names: Sequence[str], method: str) -> None:
        """Report that the current caller was greeted by `method`; waits at most the Logger
        timeout, and never raises for a failed call. A caller that goes away meanwhile does
        not cancel the report (the greeting was made): it completes in the background."""
        # The task copies this call's context: the report continues its trace and knows its user.
        task = asyncio.create_task(self._report(names, method))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        await asyncio.shield(task)

    async def finish(self) -> None:
        """Wait for the reports still in flight (each ends within the Logger timeout)."""
        await asyncio.gather(*self._in_flight, return_exceptions=True)

    async def _report(self, names: Sequence[str], method: str) -> None:
        # Who asked and which request it was travel as metadata (propagation.py).
        greeting = logger_pb2.Greeting(names=names, method=method)
        greeting.greeted_at.GetCurrentTime()
        request = logger_pb2.RecordRequest(greeting=greeting)
        # Attempts of a third of the Logger timeout each: a stuck replica costs one of them,
        # and the next goes to the next replica (retries.py). gRPC retries UNAVAILABLE within
        # each attempt, and propagation.py cuts every attempt to the caller's deadline.
        attempt_timeout = self._timeout / REPORT_ATTEMPTS
        budget = self._timeout  # the whole report, within what the caller has left
        if (left := seconds_left()) is not None:
            budget = min(budget, left - DEADLINE_MARGIN_SECONDS)

        async def attempts() -> None:
            async for attempt in report_attempts(budget):
                with attempt:
                    if attempt.retry_state.attempt_number > 1:
                        self._retries.inc()
                    await self._stub.Record(request, timeout=attempt_timeout)

        try:
            # The whole report is one call for the breaker; its timeout is the Greeter's own
            # unless the caller's deadline was sooner (breaker.is_dependency_failure).
            await self.breaker.call(attempts, deadline_was_ours=budget >= self._timeout)
        except LoggerSkipped:
            pass  # counted by the breaker, which logged when it opened
        except grpc.aio.AioRpcError as err:
            self._unlogged.labels(GO_CODE_NAMES[err.code()]).inc()
            details = " ".join((err.details() or "").split())
            if err.code() == grpc.StatusCode.UNAUTHENTICATED:  # the Logger cannot say where from
                details += f"; {Settings.variable('logger_token')} must be the Logger's own token"
            log.warning(
                "%s greeting not logged (request_id=%s): the Logger call failed with %s: %s",
                method,
                current_request_id(),
                err.code().name,
                details,
            )


@contextlib.asynccontextmanager
async def connected_greeting_log(
    settings: Settings, registry: CollectorRegistry, provider: TracerProvider
) -> AsyncIterator[GreetingLog]:
    """A GreetingLog over a channel to settings.logger_target for the block: TLS verified
    against the Logger's CA, the Logger's token on every call with the caller's user id and
    request id, client metrics and spans."""
    try:
        credentials = channel_credentials(
            settings.logger_ca, settings.logger_cert, settings.logger_key
        )
    except TlsConfigError as err:
        raise TlsConfigError(f"the Logger's TLS settings: {err}") from None
    metrics = ClientMetrics(registry)
    metrics.initialize([logger_pb2.DESCRIPTOR.services_by_name["Logger"]])
    unlogged = Counter(
        "greeter_unlogged_greetings_total",
        "Greetings whose Logger entry was lost, by the status of the failed Logger call.",
        ["grpc_code"],
        registry=registry,
    )
    for code_name in GO_CODE_NAMES.values():  # every series at 0, as ClientMetrics does
        unlogged.labels(code_name)
    tracer = ClientTracer(provider, settings.logger_target)
    channel = grpc.aio.secure_channel(
        settings.logger_target,
        credentials,
        # Round robin over the Logger's replicas, skipping any that is not serving; a replica
        # that was down is reconnected within 5 s (balancing.py).
        options=channel_options(settings.logger_target, retried=LOGGER_RETRIED),
        # Outermost first: the span covers the whole call, the metrics time it, and the
        # metadata is added last: the caller's user id and request id, and the Logger's token.
        interceptors=[
            *tracer.interceptors(),
            metrics,
            *propagating_interceptors(margin=DEADLINE_MARGIN_SECONDS),
            *client_auth_interceptors(settings.logger_token),
        ],
    )
    # Connect now rather than at the first greeting, which then need not wait for the TLS
    # handshake. The Greeter starts either way: a Logger that is not up yet is retried by
    # the channel in the background.
    channel.get_state(try_to_connect=True)
    # The attempts after the first that the Greeter makes itself. gRPC's own retries happen
    # below the interceptors; only the Logger sees them (step 15's README, "The dashboard").
    retries = Counter(
        "greeter_logger_report_retries_total",
        "Attempts at a Logger report after the first, made by the Greeter (tenacity).",
        registry=registry,
    )
    breaker = LoggerBreaker(
        settings.logger_breaker_failures, settings.logger_breaker_reset, registry
    )
    greeting_log = GreetingLog(
        logger_pb2_grpc.LoggerStub(channel), settings.logger_timeout, unlogged, breaker, retries
    )
    try:
        yield greeting_log
    finally:
        await greeting_log.finish()  # the server has stopped: no new report can start
        await channel.close()
        await tracer.flush()
