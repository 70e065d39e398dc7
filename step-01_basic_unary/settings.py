"""The server's settings: flags, with environment variables as fallbacks, then defaults."""

import argparse
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 50051
    grace: float = 10.0  # seconds in-flight calls get to finish on shutdown


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
    return Settings(**vars(parser.parse_args(argv)))
