"""Settings of the server and the client: one declaration per option (its flag, its
environment variable, its default and its help), and the parsing they share.

Flags win over environment variables, which win over the defaults. A bad value is refused
at start-up with a message naming where it came from: `--port 70000`, or `GREETER_PORT=http`.
"""

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from auth import TOKEN_VARIABLE
from rpc_log import BatchedStreamHandler


def option(
    default: Any, env: str, help: str, *, parse: Callable[[str], Any] = str, flag: bool = True
) -> Any:
    """A setting read from `--its-name` (unless `flag` is False) or from `env`."""
    return field(default=default, metadata={"env": env, "help": help, "parse": parse, "flag": flag})


# --- Parsers: text in, value out, ValueError with a readable reason ----------------------


def port_number(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise ValueError("a port is a number from 0 to 65535")
    return int(text)


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("a number of seconds, such as 2.5") from None
    if not 0 <= value < float("inf"):
        raise ValueError("seconds must be zero or more")
    return value


def positive_seconds(text: str) -> float:
    value = seconds(text)
    if value == 0:
        raise ValueError("seconds must be more than zero")
    return value


def log_level(text: str) -> str:
    level = text.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("one of DEBUG, INFO, WARNING, ERROR")
    return level


# --- The server's settings ----------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    host: str = option("127.0.0.1", "GREETER_HOST", "address to bind (0.0.0.0: all interfaces)")
    port: int = option(
        50051, "GREETER_PORT", "port to listen on; 0 picks a free one", parse=port_number
    )
    grace: float = option(
        10.0,
        "GREETER_SHUTDOWN_GRACE",
        "seconds in-flight calls get to finish on shutdown",
        parse=seconds,
    )
    # One line per RPC from step 04 on is the biggest per-call cost: WARNING keeps only failures.
    log_level: str = option(
        "INFO", "GREETER_LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR", parse=log_level
    )
    # Seconds between reporting NOT_SERVING and refusing calls, so that load balancers and
    # Kubernetes (which poll health every few seconds) stop sending first.
    drain_delay: float = option(
        0.0,
        "GREETER_DRAIN_DELAY",
        "seconds to keep serving after health turns NOT_SERVING on shutdown",
        parse=seconds,
    )
    # Keepalive (keepalive.py): the server pings a client that has been silent this long, and
    # accepts the client's own pings this often at most.
    keepalive_time: float = option(
        60.0,
        "GREETER_KEEPALIVE_TIME",
        "seconds of silence after which the server pings a client to check it is still there",
        parse=positive_seconds,
    )
    permit_keepalive_time: float = option(
        10.0,
        "GREETER_PERMIT_KEEPALIVE_TIME",
        "the shortest interval between a client's pings the server accepts; a client that "
        "pings more often is sent away (GOAWAY too_many_pings)",
        parse=positive_seconds,
    )
    stream_interval: float = option(
        0.5,
        "GREETER_STREAM_INTERVAL",
        "seconds between two replies of StreamGreetings",
        parse=seconds,
    )
    # The bearer token callers must send. From the environment only: a flag would show in
    # `ps` and in shell history. repr=False keeps it out of any printed Settings.
    token: str | None = field(
        default=None, repr=False, metadata={"env": TOKEN_VARIABLE, "parse": str, "flag": False}
    )
    tls_cert: str = option("certs/server.crt", "GREETER_TLS_CERT", "the server's certificate (PEM)")
    tls_key: str = option("certs/server.key", "GREETER_TLS_KEY", "its private key (PEM)")
    tls_client_ca: str | None = option(
        None,
        "GREETER_TLS_CLIENT_CA",
        "require mutual TLS: clients need a certificate signed by this CA (PEM)",
    )


# --- Parsing ------------------------------------------------------------------------------


def flag_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse` for argparse: its reason becomes the error message."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None

    convert.__name__ = parse.__name__
    return convert


def add_options(
    parser: argparse.ArgumentParser, settings_class: type, environ: Mapping[str, str] = os.environ
) -> None:
    """A flag for each option of `settings_class`, its default from the environment. A bad
    environment value ends the program with a message that names the variable."""
    for option_field in fields(settings_class):
        meta = option_field.metadata
        if not meta.get("flag"):
            continue
        default = from_environment(parser, option_field, environ)
        shown = (
            "" if option_field.default in (None, MISSING) else f"; default {option_field.default}"
        )
        parser.add_argument(
            f"--{option_field.name.replace('_', '-')}",
            type=flag_type(meta["parse"]),
            default=default,
            help=f"{meta['help']} ({meta['env']}{shown})",
        )


def from_environment(parser: argparse.ArgumentParser, option_field, environ: Mapping[str, str]):
    meta = option_field.metadata
    text = environ.get(meta["env"], "")
    if text == "":  # unset and empty mean the same: the default
        return option_field.default
    try:
        return meta["parse"](text)
    except ValueError as err:
        parser.error(f"{meta['env']}={text!r}: {err}")


def parse_settings(
    argv: list[str] | None = None, environ: Mapping[str, str] = os.environ
) -> Settings:
    parser = argparse.ArgumentParser(description="Greeter gRPC server")
    add_options(parser, Settings, environ)
    values = vars(parser.parse_args(argv))
    for option_field in fields(Settings):  # options without a flag: from the environment only
        if not option_field.metadata.get("flag"):
            values[option_field.name] = from_environment(parser, option_field, environ)
    return Settings(**values)


def configure_logging(level: str) -> None:
    """The server's log: to stderr, a line per record. Every RPC writes one (rpc_log.py), so
    what a line costs counts: they are written in batches (BatchedStreamHandler)."""
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[BatchedStreamHandler(sys.stderr)],
    )
    # logging also finds out, for every record, which file, line, thread and process wrote
    # it, which this format never shows (the logging HOWTO, "Optimization", names these).
    logging._srcfile = None  # no stack walk for the caller's file, line and function
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
