"""The Greeter's side of the Logger: one channel, opened when the server starts and reused by
every call, and `GreetingLog.record`, which reports a greeting and never fails the greeting.

The log entry is a side effect; the greeting is the product. So a call to the Logger has a
deadline (GREETER_LOGGER_TIMEOUT), and when it fails (the Logger is down, slow, or refuses
the call) the Greeter logs one WARNING, counts it in greeter_unlogged_greetings_total, and
answers its caller as if nothing happened. step 10's README, "When the Logger is slow or down".
"""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

import grpc
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry, Counter

import keepalive
from auth import client_auth_interceptors
from caller import current_user_id
from logger.v1 import logger_pb2, logger_pb2_grpc
from metrics import GO_CODE_NAMES, ClientMetrics
from settings import Settings
from tls import TlsConfigError, channel_credentials
from tracing import ClientTracer

# Who the Greeter is to the Logger: the x-user-id of its calls, stored as `recorded_by`.
GREETER_USER_ID = "greeter"
# While the Logger is down the channel tries to reconnect, waiting longer after each failure:
# 1 s, 1.6 s, ... up to gRPC's default of 120 s. Capped here, so a Logger back after a long
# outage gets its entries again within seconds, not minutes.
MAX_RECONNECT_BACKOFF_MS = 5000

log = logging.getLogger("greeter.logger_client")


class GreetingLog:
    """Reports greetings to the Logger through one shared stub."""

    def __init__(self, stub: "logger_pb2_grpc.LoggerAsyncStub", timeout: float, unlogged: Counter):
        self._stub, self._timeout, self._unlogged = stub, timeout, unlogged
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
        greeting = logger_pb2.Greeting(names=names, user_id=current_user_id(), method=method)
        greeting.greeted_at.GetCurrentTime()
        try:
            await self._stub.Record(
                logger_pb2.RecordRequest(greeting=greeting), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as err:
            self._unlogged.labels(GO_CODE_NAMES[err.code()]).inc()
            details = " ".join((err.details() or "").split())
            if err.code() == grpc.StatusCode.UNAUTHENTICATED:  # the Logger cannot say where from
                details += f"; {Settings.variable('logger_token')} must be the Logger's own token"
            log.warning(
                "%s greeting not logged: the Logger call failed with %s: %s",
                method,
                err.code().name,
                details,
            )


@contextlib.asynccontextmanager
async def connected_greeting_log(
    settings: Settings, registry: CollectorRegistry, provider: TracerProvider
) -> AsyncIterator[GreetingLog]:
    """A GreetingLog over a channel to settings.logger_target for the block: TLS verified
    against the Logger's CA, the Logger's token on every call, client metrics and spans."""
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
        options=[
            ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
            *keepalive.CLIENT_OPTIONS,
        ],
        # Outermost first: the span covers the whole call, the metrics time it, and the
        # credentials are added last.
        interceptors=[
            *tracer.interceptors(),
            metrics,
            *client_auth_interceptors(settings.logger_token, GREETER_USER_ID),
        ],
    )
    # Connect now rather than at the first greeting, which then need not wait for the TLS
    # handshake. The Greeter starts either way: a Logger that is not up yet is retried by
    # the channel in the background.
    channel.get_state(try_to_connect=True)
    greeting_log = GreetingLog(
        logger_pb2_grpc.LoggerStub(channel), settings.logger_timeout, unlogged
    )
    try:
        yield greeting_log
    finally:
        await greeting_log.finish()  # the server has stopped: no new report can start
        await channel.close()
        await tracer.flush()
