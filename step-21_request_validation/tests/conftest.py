"""The fixtures of this folder's tests: servers (in-process and real processes), channels,
and what they need to run. What the tests call besides fixtures is in helpers.py."""

import contextlib
import shutil
from pathlib import Path

import pytest

import logger_server
import server
from auth import TOKEN_VARIABLE
from greeter.v1 import greeter_pb2_grpc
from helpers import (
    CERTS,
    FAST_STREAM_INTERVAL,
    LOGGER_TEST_TOKEN,
    STEP_DIR,
    TEST_TOKEN,
    UNREACHED_RATE_LIMIT_ENVIRONMENT,
    ServerInTest,
    open_channel,
    server_settings,
)
from service import Greeter
from settings import LoggerSettings
from tests.support.helpers import require_binary
from tools.broker import KafkaBroker, S3Server
from tools.otlp_receiver import OtlpReceiver
from tools.processes import ServerProcess, make_certificates
from tools.redis import RedisServer


@pytest.fixture(autouse=True, scope="session")
def receiver():
    """Tracing on in every test: servers and clients export their spans to a real OTLP
    receiver, in batches 50 ms apart (instead of 5 s) so that tests need not wait."""
    with OtlpReceiver() as otlp, pytest.MonkeyPatch.context() as patch:
        patch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.endpoint)
        patch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        yield otlp


@pytest.fixture(autouse=True, scope="session")
def secrets_in_the_environment():
    """A fresh token, and certificates made by ./gen_certs.sh as a learner makes them. Server
    and client processes read both from the environment, as a learner's do; and rate
    limits that only the rate-limit tests reach (they set their own)."""
    require_binary(
        "openssl", "sudo apt-get install openssl (Debian/Ubuntu), brew install openssl (macOS)"
    )
    tls_environment = make_certificates(STEP_DIR, CERTS)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(TOKEN_VARIABLE, TEST_TOKEN)
        patch.setenv("LOGGER_AUTH_TOKEN", LOGGER_TEST_TOKEN)
        for name, value in {**tls_environment, **UNREACHED_RATE_LIMIT_ENVIRONMENT}.items():
            patch.setenv(name, value)
        yield
    shutil.rmtree(CERTS)


@pytest.fixture(autouse=True, scope="session")
def kafka():
    """A real Kafka-protocol broker for the whole session: every Greeter publishes its events
    to it and every Logger counts them, in-process or as a process (KAFKA_BOOTSTRAP_SERVERS).
    Its log is in memory: it is never restarted. (In S3 it made most of the suite's S3
    traffic, 3,005 of 4,936 requests, which slowed the brokers the tests restart.) Tests
    about the events get a broker of their own (`broker`)."""
    with KafkaBroker() as session_broker, pytest.MonkeyPatch.context() as patch:
        patch.setenv("KAFKA_BOOTSTRAP_SERVERS", session_broker.bootstrap)
        patch.setenv("LOGGER_EVENTS_ASSIGNMENT", "all")  # no group join: it takes seconds
        yield session_broker


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server, started once: its start costs 2-3 s of CPU. Only the brokers the
    tests restart use it, each in a bucket of its own, one test at a time."""
    with S3Server() as server:
        yield server


@pytest.fixture
def broker(s3):
    """A broker of the test's own that keeps its log in S3, so that it can be stopped and
    started again with its log: `broker.stop()`, `broker.start()`."""
    with KafkaBroker(s3) as own:
        yield own


@pytest.fixture
def redis():
    """A Redis of the test's own (tools/redis.py), where replicas share their rate limits:
    `redis.url`, `redis.stop()`, `redis.start()`."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def memory_broker():
    """A broker of the test's own that keeps its log in memory: for a test that never stops
    it (a fetch right after a write is prompt there, where S3 storage now and then is not)."""
    with KafkaBroker() as own:
        yield own


@pytest.fixture(autouse=True, scope="session")
def logger_process(receiver, secrets_in_the_environment, kafka):
    """`python logger_server.py --port 0`, running for the whole session: every Greeter
    process a test starts reports to it (GREETER_LOGGER_TARGET), as a learner's does to the
    Logger beside it. In-process Greeters get a Logger of their own (`start_server`)."""
    with (
        ServerProcess(STEP_DIR, script="logger_server.py") as process,
        pytest.MonkeyPatch.context() as patch,
    ):
        patch.setenv("GREETER_LOGGER_TARGET", process.address)
        yield process


@pytest.fixture(scope="session")
def other_certs(tmp_path_factory) -> Path:
    """A second, unrelated CA with its own server and client certificates."""
    directory = tmp_path_factory.mktemp("other-certs")
    make_certificates(STEP_DIR, directory)
    return directory


@pytest.fixture
async def start_logger():
    """Start real Logger servers on free loopback ports, in the test's loop:
    `logger = await start_logger(servicer_class, port=...)`. Shut down at the end."""
    lifetimes = []

    async def start(servicer_class=None, **overrides) -> ServerInTest:
        lifetime = contextlib.AsyncExitStack()
        lifetimes.append(lifetime)
        settings = server_settings(LoggerSettings, **overrides)
        running = await lifetime.enter_async_context(
            logger_server.running_server(
                settings, servicer_class or logger_server.GreetingLogService
            )
        )
        return ServerInTest(running, lifetime)

    yield start
    for lifetime in reversed(lifetimes):
        await lifetime.aclose()  # does nothing for a server the test shut down


@pytest.fixture
async def start_server(start_logger):
    """Start real Greeter servers (this folder's wiring and lifetime) on free loopback ports,
    in the test's loop: `server = await start_server(servicer_class, grace=10)`. Each one
    gets a Logger of its own (`server.logger`) unless `logger_target` says where one is.
    Each one still running at the end of the test is shut down."""
    lifetimes = []

    async def start(servicer_class=None, **overrides) -> ServerInTest:
        logger = None
        if "logger_target" not in overrides:
            logger = await start_logger()
            overrides["logger_target"] = logger.address
        lifetime = contextlib.AsyncExitStack()
        lifetimes.append(lifetime)
        running = await lifetime.enter_async_context(
            server.running_server(server_settings(**overrides), servicer_class or Greeter)
        )
        return ServerInTest(running, lifetime, logger)

    yield start
    for lifetime in reversed(lifetimes):
        await lifetime.aclose()  # does nothing for a server the test shut down


@pytest.fixture
async def server_address(start_server):
    return (await start_server(stream_interval=FAST_STREAM_INTERVAL)).address


@pytest.fixture
async def channel(server_address):
    async with open_channel(server_address) as channel:
        yield channel


@pytest.fixture
def stub(channel):
    return greeter_pb2_grpc.GreeterStub(channel)


@pytest.fixture
def server_process():
    """`python server.py --port 0` as a learner runs it (its Logger: `logger_process`)."""
    with ServerProcess(STEP_DIR, "--stream-interval", str(FAST_STREAM_INTERVAL)) as process:
        yield process


@pytest.fixture(scope="module")
def shared_server_process():
    """The same, started once for the tests of a module that only call it, as a learner
    leaves a server running in one terminal and tries commands in another: none of them
    stops it, floods it or reads its output. One start per module instead of one per test."""
    with ServerProcess(STEP_DIR, "--stream-interval", str(FAST_STREAM_INTERVAL)) as process:
        yield process
