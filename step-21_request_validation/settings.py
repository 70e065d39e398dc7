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
from typing import Any, ClassVar

from balancing import replica_target
from rpc_log import BatchedStreamHandler


def option(
    default: Any, env: str, help: str, *, parse: Callable[[str], Any] = str, flag: bool = True
) -> Any:
    """A setting read from `--its-name` (unless `flag` is False) or from `env`."""
    return field(default=default, metadata={"env": env, "help": help, "parse": parse, "flag": flag})


def secret(env: str) -> Any:
    """A setting read from `env` only: a flag would show in `ps` and in shell history, and
    repr=False keeps it out of any printed settings."""
    return field(default=None, repr=False, metadata={"env": env, "parse": str, "flag": False})


def env_variable(settings_class: type, option_field) -> str:
    """The name of the variable an option is read from, `{SERVICE}` filled in."""
    return option_field.metadata["env"].format(SERVICE=getattr(settings_class, "SERVICE", ""))


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


def positive_number(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise ValueError("a whole number more than zero")
    return int(text)


def yes_no(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise ValueError("true or false")
    return text.lower() == "true"


def assignment(text: str) -> str:
    if text not in ("group", "all"):
        raise ValueError("group or all")
    return text


def redis_url(text: str) -> str:
    if not text.startswith(("redis://", "rediss://", "unix://")) or text.endswith("://"):
        raise ValueError("a Redis URL, such as redis://127.0.0.1:6379/0")
    return text


def log_level(text: str) -> str:
    level = text.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("one of DEBUG, INFO, WARNING, ERROR")
    return level


# --- The servers' settings ---------------------------------------------------------------
# Both services of this step, the Greeter and the Logger, run the same server code with the
# same options. An option's variable is named after the service: `{SERVICE}_PORT` is
# GREETER_PORT for the Greeter and LOGGER_PORT for the Logger.


def port_option(default: int) -> Any:
    return option(
        default, "{SERVICE}_PORT", "port to listen on; 0 picks a free one", parse=port_number
    )


def metrics_port_option(default: int) -> Any:
    return option(
        default, "{SERVICE}_METRICS_PORT", "port of /metrics; 0 picks a free one", parse=port_number
    )


@dataclass(frozen=True)
class ServerSettings:
    SERVICE: ClassVar[str]  # the prefix of the variables: GREETER, LOGGER

    host: str = option("127.0.0.1", "{SERVICE}_HOST", "address to bind (0.0.0.0: all interfaces)")
    port: int = port_option(50051)
    grace: float = option(
        10.0,
        "{SERVICE}_SHUTDOWN_GRACE",
        "seconds in-flight calls get to finish on shutdown",
        parse=seconds,
    )
    # One line per RPC from step 04 on is the biggest per-call cost: WARNING keeps only failures.
    log_level: str = option(
        "INFO", "{SERVICE}_LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR", parse=log_level
    )
    # /metrics for Prometheus, on a port of its own (not 9090: that is Prometheus's own).
    metrics_host: str = option(
        "127.0.0.1", "{SERVICE}_METRICS_HOST", "address of /metrics (0.0.0.0: all interfaces)"
    )
    metrics_port: int = metrics_port_option(9464)
    # Seconds between reporting NOT_SERVING and refusing calls, so that load balancers and
    # Kubernetes (which poll health every few seconds) stop sending first.
    drain_delay: float = option(
        0.0,
        "{SERVICE}_DRAIN_DELAY",
        "seconds to keep serving after health turns NOT_SERVING on shutdown",
        parse=seconds,
    )
    # Keepalive (keepalive.py): the server pings a client that has been silent this long, and
    # accepts the client's own pings this often at most.
    keepalive_time: float = option(
        60.0,
        "{SERVICE}_KEEPALIVE_TIME",
        "seconds of silence after which the server pings a client to check it is still there",
        parse=positive_seconds,
    )
    permit_keepalive_time: float = option(
        10.0,
        "{SERVICE}_PERMIT_KEEPALIVE_TIME",
        "the shortest interval between a client's pings the server accepts; a client that "
        "pings more often is sent away (GOAWAY too_many_pings)",
        parse=positive_seconds,
    )
    # Connections do not last for ever (rebalancing.py): after this long the server asks a
    # client to reconnect, and the client asks DNS again and finds replicas added since.
    max_connection_age: float = option(
        30.0,
        "{SERVICE}_MAX_CONNECTION_AGE",
        "seconds after which a client is asked to reconnect (GOAWAY), so that it finds new "
        "replicas",
        parse=positive_seconds,
    )
    max_connection_age_grace: float | None = option(
        None,
        "{SERVICE}_MAX_CONNECTION_AGE_GRACE",
        "seconds the calls still open on an aged connection get before it is closed; "
        "default: no limit, a stream ends on its own",
        parse=positive_seconds,
    )
    # Kubernetes' own gRPC probe speaks neither TLS nor tokens: it asks this plaintext port,
    # which serves the health service and nothing else (step 20's README, "Probes").
    health_port: int | None = option(
        None,
        "{SERVICE}_HEALTH_PORT",
        "plaintext port of the health service alone, for Kubernetes probes; default: none",
        parse=port_number,
    )
    # The bearer token callers must send.
    token: str | None = secret("{SERVICE}_AUTH_TOKEN")
    tls_cert: str = option(
        "certs/server.crt", "{SERVICE}_TLS_CERT", "the server's certificate (PEM)"
    )
    tls_key: str = option("certs/server.key", "{SERVICE}_TLS_KEY", "its private key (PEM)")
    tls_client_ca: str | None = option(
        None,
        "{SERVICE}_TLS_CLIENT_CA",
        "require mutual TLS: clients need a certificate signed by this CA (PEM)",
    )
    # Each caller's token bucket (ratelimit.py): README, "How it works". The Greeter's
    # callers are users; the Logger's are services.
    rate_limit: int = option(
        10,
        "{SERVICE}_RATE_LIMIT",
        "calls a second each caller may make, on average",
        parse=positive_number,
    )
    rate_burst: int = option(
        20,
        "{SERVICE}_RATE_BURST",
        "calls a caller may make at once after a pause (the bucket's size)",
        parse=positive_number,
    )
    rate_limit_redis: str | None = option(
        None,
        "{SERVICE}_RATE_LIMIT_REDIS",
        "share the buckets with every replica through this Redis (redis://HOST:PORT/DB); "
        "default: each replica on its own",
        parse=redis_url,
    )
    # Sent back as x-served-by on every call: which replica answered. In Kubernetes, the pod's
    # name (the host name) is a good one.
    replica_name: str | None = option(
        None, "{SERVICE}_REPLICA_NAME", "this replica's name in x-served-by (default: HOST:PORT)"
    )

    @classmethod
    def variable(cls, name: str) -> str:
        """The environment variable of the option `name` (`token`: GREETER_AUTH_TOKEN)."""
        return env_variable(cls, next(f for f in fields(cls) if f.name == name))

    def secrets(self) -> dict[str, str | None]:
        """The tokens the server needs, by variable: its own, and those of the services it
        calls."""
        return {
            env_variable(type(self), f): getattr(self, f.name)
            for f in fields(self)
            if not f.metadata.get("flag")
        }


@dataclass(frozen=True)
class Settings(ServerSettings):
    """The Greeter's settings, and how it reaches the Logger."""

    SERVICE: ClassVar[str] = "GREETER"

    # The previous release is this code with v2 off: step 17's README,
    # "Two releases, one code base".
    serve_v2: bool = option(
        True, "GREETER_SERVE_V2", "serve greeter.v2 beside greeter.v1: true or false", parse=yes_no
    )
    stream_interval: float = option(
        0.5,
        "GREETER_STREAM_INTERVAL",
        "seconds between two replies of StreamGreetings",
        parse=seconds,
    )
    logger_target: str = option(
        "127.0.0.1:50052",
        "GREETER_LOGGER_TARGET",
        "the Logger's address, or its replicas: ipv4:HOST:PORT,HOST:PORT or dns:///NAME:PORT",
        parse=replica_target,
    )
    # What a greeting may wait for its log entry: step 10's README,
    # "When the Logger is slow or down".
    logger_timeout: float = option(
        0.5,
        "GREETER_LOGGER_TIMEOUT",
        "deadline of each call to the Logger, in seconds",
        parse=positive_seconds,
    )
    # When the Logger keeps failing, stop calling it for a while: step 14's README,
    # "The circuit breaker".
    logger_breaker_failures: int = option(
        5,
        "GREETER_LOGGER_BREAKER_FAILURES",
        "failed Logger calls in a row that open the circuit breaker",
        parse=positive_number,
    )
    logger_breaker_reset: float = option(
        5.0,
        "GREETER_LOGGER_BREAKER_RESET",
        "seconds the open breaker skips the Logger before one trial call",
        parse=positive_seconds,
    )
    # Where the GreetedEvents go (outbox.py); the variable is the one Kafka tools read.
    kafka_bootstrap_servers: str = option(
        "127.0.0.1:9092",
        "KAFKA_BOOTSTRAP_SERVERS",
        "the Kafka brokers the events go to: HOST:PORT[,HOST:PORT...]",
    )
    events_outbox: int = option(
        10000,
        "GREETER_EVENTS_OUTBOX",
        "events kept while the broker is away; more are dropped and counted",
        parse=positive_number,
    )
    logger_ca: str = option(
        "certs/ca.crt", "GREETER_LOGGER_TLS_CA", "the CA that signed the Logger's certificate (PEM)"
    )
    logger_cert: str | None = option(
        None, "GREETER_LOGGER_TLS_CLIENT_CERT", "client certificate for the Logger (mutual TLS)"
    )
    logger_key: str | None = option(None, "GREETER_LOGGER_TLS_CLIENT_KEY", "its private key")
    # The Logger's token, which the Greeter sends on every call to it: the same variable the
    # Logger reads its own from.
    logger_token: str | None = secret("LOGGER_AUTH_TOKEN")


@dataclass(frozen=True)
class LoggerSettings(ServerSettings):
    """The Logger's settings."""

    SERVICE: ClassVar[str] = "LOGGER"

    port: int = port_option(50052)
    metrics_port: int = metrics_port_option(9465)
    # Each calling service reports every greeting of all its users: a bigger bucket.
    rate_limit: int = option(
        1000,
        "LOGGER_RATE_LIMIT",
        "calls a second each calling service may make, on average",
        parse=positive_number,
    )
    rate_burst: int = option(
        2000,
        "LOGGER_RATE_BURST",
        "calls a service may make at once after a pause (the bucket's size)",
        parse=positive_number,
    )
    max_entries: int = option(
        1000,
        "LOGGER_MAX_ENTRIES",
        "entries kept in memory (and event ids remembered); the oldest go first",
        parse=positive_number,
    )
    kafka_bootstrap_servers: str = option(
        "127.0.0.1:9092",
        "KAFKA_BOOTSTRAP_SERVERS",
        "the Kafka brokers the Greeter's events are read from: HOST:PORT[,HOST:PORT...]",
    )
    # "group": Kafka shares the topic's partitions among the group's consumers (a join takes
    # seconds). "all": this consumer reads every partition at once, as one consumer may.
    events_assignment: str = option(
        "group",
        "LOGGER_EVENTS_ASSIGNMENT",
        "group (join the consumer group) or all (read every partition)",
        parse=assignment,
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
        default = from_environment(parser, settings_class, option_field, environ)
        shown = (
            "" if option_field.default in (None, MISSING) else f"; default {option_field.default}"
        )
        parser.add_argument(
            f"--{option_field.name.replace('_', '-')}",
            type=flag_type(meta["parse"]),
            default=default,
            help=f"{meta['help']} ({env_variable(settings_class, option_field)}{shown})",
        )


def from_environment(
    parser: argparse.ArgumentParser, settings_class: type, option_field, environ: Mapping[str, str]
):
    variable = env_variable(settings_class, option_field)
    text = environ.get(variable, "")
    if text == "":  # unset and empty mean the same: the default
        return option_field.default
    try:
        return option_field.metadata["parse"](text)
    except ValueError as err:
        parser.error(f"{variable}={text!r}: {err}")


def parse_settings(
    argv: list[str] | None = None,
    environ: Mapping[str, str] = os.environ,
    settings_class: type[ServerSettings] = Settings,
) -> Any:
    """The settings of a server (the Greeter's unless `settings_class` says otherwise)."""
    parser = argparse.ArgumentParser(description=f"{settings_class.SERVICE.title()} gRPC server")
    add_options(parser, settings_class, environ)
    values = vars(parser.parse_args(argv))
    for option_field in fields(settings_class):  # no flag: from the environment only
        if not option_field.metadata.get("flag"):
            values[option_field.name] = from_environment(
                parser, settings_class, option_field, environ
            )
    return settings_class(**values)


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
