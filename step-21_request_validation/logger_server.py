"""Logger server: the Logger service (logger_service.py), served as serving.py serves the
Greeter too: TLS, its own token, health, reflection, metrics, traces, a log line
per RPC, graceful shutdown.

    python logger_server.py [--host 127.0.0.1] [--port 50052] [--max-entries 1000]

Prints `metrics on HOST:PORT`, then `listening on HOST:PORT` once it serves, and shuts down
gracefully on SIGINT/SIGTERM. Callers need LOGGER_AUTH_TOKEN, not the Greeter's token.
"""

import contextlib
import sys

import serving  # before any module that imports grpc: it quiets gRPC's C core
from caller import service_subject
from greeting_counts import counting_greetings
from logger.v1 import logger_pb2, logger_pb2_grpc
from logger_service import MAX_RECORD_BYTES, MAX_REPLY_BYTES, GreetingLogService
from settings import LoggerSettings, parse_settings

LOGGER = serving.Service(
    name="logger",
    descriptors=(logger_pb2.DESCRIPTOR.services_by_name["Logger"],),  # logger.v1.Logger
    register=logger_pb2_grpc.add_LoggerServicer_to_server,
    max_request_bytes=MAX_RECORD_BYTES,
    max_reply_bytes=MAX_REPLY_BYTES,
    rate_limit_subject=service_subject,
    rate_limit_name="per_service",
    # The limit is on what services record; a read returns at most 100 entries.
    rate_limit_exempt=frozenset({"logger.v1.Logger/ListRecent"}),
)


def running_server(
    settings: LoggerSettings, servicer_class: type[GreetingLogService] = GreetingLogService
) -> contextlib.AbstractAsyncContextManager[serving.RunningServer]:
    """The Logger's lifetime (serving.running_server), with the consumer of the Greeter's
    events beside the service."""

    async def start_logger(resources: contextlib.AsyncExitStack, telemetry: serving.Telemetry):
        # The Greeter's events, counted per user, beside the service (greeting_counts.py).
        await resources.enter_async_context(
            counting_greetings(
                settings.kafka_bootstrap_servers,
                settings.events_assignment,
                settings.max_entries,
                telemetry.registry,
                telemetry.provider,
            )
        )
        return servicer_class(settings.max_entries)

    return serving.running_server(settings, LOGGER, start_logger)


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv, settings_class=LoggerSettings)
    return serving.main(settings, lambda: running_server(settings))


if __name__ == "__main__":
    sys.exit(main())
