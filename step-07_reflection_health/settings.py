"""The server's settings: flags, with environment variables as fallbacks, then defaults."""

import argparse
import os
from dataclasses import dataclass, field

from auth import TOKEN_VARIABLE


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 50051
    grace: float = 10.0  # seconds in-flight calls get to finish on shutdown
    # Seconds between reporting NOT_SERVING and refusing calls, so that load balancers and
    # Kubernetes (which poll health every few seconds) stop sending first.
    drain_delay: float = 0.0
    stream_interval: float = 0.5  # seconds between two replies of StreamGreetings
    # The bearer token callers must send. From the environment only: a flag would show in
    # `ps` and in shell history. repr=False keeps it out of any printed Settings.
    token: str | None = field(default=None, repr=False)
    tls_cert: str = "certs/server.crt"  # the server's certificate (PEM)
    tls_key: str = "certs/server.key"  # its private key (PEM)
    tls_client_ca: str | None = None  # set: mutual TLS, clients need a certificate from this CA


def port_number(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError(text)
    return port


def parse_settings(argv: list[str] | None = None) -> Settings:
    # Flags win over environment variables, which win over the defaults. argparse converts
    # string defaults with `type`, so a bad environment value gets the same clear error.
    env = os.environ.get
    parser = argparse.ArgumentParser(description="Greeter gRPC server")
    parser.add_argument(
        "--host", default=env("GREETER_HOST", Settings.host), help="address to bind (GREETER_HOST)"
    )
    parser.add_argument(
        "--port",
        type=port_number,
        default=env("GREETER_PORT", str(Settings.port)),
        help="port to listen on, 0 picks a free one (GREETER_PORT)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=env("GREETER_SHUTDOWN_GRACE", str(Settings.grace)),
        help="seconds in-flight calls get to finish on shutdown (GREETER_SHUTDOWN_GRACE)",
    )
    parser.add_argument(
        "--drain-delay",
        type=float,
        default=env("GREETER_DRAIN_DELAY", str(Settings.drain_delay)),
        help="seconds to keep serving after health turns NOT_SERVING on shutdown (GREETER_DRAIN_DELAY)",
    )
    parser.add_argument(
        "--stream-interval",
        type=float,
        default=env("GREETER_STREAM_INTERVAL", str(Settings.stream_interval)),
        help="seconds between two replies of StreamGreetings (GREETER_STREAM_INTERVAL)",
    )
    parser.add_argument(
        "--tls-cert",
        default=env("GREETER_TLS_CERT", Settings.tls_cert),
        help="server certificate, PEM (GREETER_TLS_CERT)",
    )
    parser.add_argument(
        "--tls-key",
        default=env("GREETER_TLS_KEY", Settings.tls_key),
        help="server private key, PEM (GREETER_TLS_KEY)",
    )
    parser.add_argument(
        "--tls-client-ca",
        default=env("GREETER_TLS_CLIENT_CA") or None,
        help="require mutual TLS: clients need a certificate signed by this CA (GREETER_TLS_CLIENT_CA)",
    )
    return Settings(**vars(parser.parse_args(argv)), token=env(TOKEN_VARIABLE))
