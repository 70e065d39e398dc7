"""Greeter server: the Greeter service, served as serving.py serves the Logger too, with
its channel to the Logger (logger_client.py) held for the server's lifetime.

    python server.py [--host 127.0.0.1] [--port 50051] [--logger-target 127.0.0.1:50052]

Prints `metrics on HOST:PORT`, then `listening on HOST:PORT` once it serves (tools and tests
read the ports from them), and shuts down gracefully on SIGINT/SIGTERM. It starts whether
or not the Logger is up: greetings never wait for it
(step 10's README, "When the Logger is slow or down").
"""

import contextlib
import sys

import serving  # before any module that imports grpc: it quiets gRPC's C core
from caller import user_subject
from greeter.v1 import greeter_pb2, greeter_pb2_grpc
from greeter.v2 import greeter_pb2 as greeter_v2_pb2
from greeter.v2 import greeter_pb2_grpc as greeter_v2_pb2_grpc
from logger_client import connected_greeting_log
from outbox import publishing_events
from service import Greeter
from service_v2 import GreeterV2
from settings import Settings, parse_settings

# Requests and replies are small: a name of at most 100 characters.
MAX_MESSAGE_BYTES = 4 * 1024
# ... but reflection's answers carry the protos' descriptors, with what they import: since
# the HTTP mapping (step 19), google/api/http.proto's too, some 16 KiB for a service; since
# the rules (step 21), buf/validate/validate.proto's, some 70 KiB in all.
MAX_REPLY_BYTES = 256 * 1024

GREETER_V1 = greeter_pb2.DESCRIPTOR.services_by_name["Greeter"]
GREETER_V2 = greeter_v2_pb2.DESCRIPTOR.services_by_name["GreeterService"]
GREETER_SERVICE = GREETER_V1.full_name  # greeter.v1.Greeter
GREETER_V2_SERVICE = GREETER_V2.full_name  # greeter.v2.GreeterService


def register_v1_and_v2(greeter: Greeter, server) -> None:
    greeter_pb2_grpc.add_GreeterServicer_to_server(greeter, server)
    greeter_v2_pb2_grpc.add_GreeterServiceServicer_to_server(GreeterV2(greeter), server)


def greeter_service(serve_v2: bool) -> serving.Service:
    """The new release serves v1 and v2; the previous one, v1 only: the same code with
    GREETER_SERVE_V2=false (step 17's README, "Two releases, one code base")."""
    return serving.Service(
        name="greeter",
        descriptors=(GREETER_V1, GREETER_V2) if serve_v2 else (GREETER_V1,),
        register=register_v1_and_v2 if serve_v2 else greeter_pb2_grpc.add_GreeterServicer_to_server,
        max_request_bytes=MAX_MESSAGE_BYTES,
        max_reply_bytes=MAX_REPLY_BYTES,
        rate_limit_subject=user_subject,
        rate_limit_name="per_user",
    )


def running_server(
    settings: Settings, servicer_class: type[Greeter] = Greeter
) -> contextlib.AbstractAsyncContextManager[serving.RunningServer]:
    """The Greeter's lifetime (serving.running_server): the channel to the Logger and the
    events' outbox are opened before the server starts, and closed after it has stopped."""

    async def start_greeter(resources: contextlib.AsyncExitStack, telemetry: serving.Telemetry):
        greeting_log = await resources.enter_async_context(
            connected_greeting_log(settings, telemetry.registry, telemetry.provider)
        )
        # Entered after the Logger's channel, so left before it: the outbox drains first.
        events = await resources.enter_async_context(
            publishing_events(
                settings.kafka_bootstrap_servers,
                settings.events_outbox,
                settings.grace,
                telemetry.registry,
            )
        )
        return servicer_class(greeting_log, events, settings.stream_interval)

    return serving.running_server(settings, greeter_service(settings.serve_v2), start_greeter)


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    return serving.main(settings, lambda: running_server(settings))


if __name__ == "__main__":
    sys.exit(main())
