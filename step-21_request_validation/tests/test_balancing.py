"""Load balancing with real replicas (processes): calls spread round robin over three
Greeters, a replica that reports NOT_SERVING gets no new calls, SIGTERM under a steady load
fails no call, a restarted replica gets calls again, all replicas down is one fast
UNAVAILABLE, and the Greeter spreads its reports over two Loggers. Every reply names the
replica that served it (x-served-by)."""

import asyncio
import collections
import signal
import socket
import time

import grpc
import pytest

from balancing import channel_options, served_by
from greeter.v1 import greeter_pb2_grpc
from helpers import STEP_DIR, Request, logged_greetings, open_channel, run_client, scrape, value
from tests.support.helpers import closed_port, eventually
from tools.processes import ServerProcess, StepServices, free_port, run_script

HOST = socket.gethostname()


def balanced_channel(target: str) -> grpc.aio.Channel:
    """A channel as client.py opens one: round robin, client-side health checking."""
    return open_channel(target, options=channel_options(target))


def replica_of(process: ServerProcess) -> str:
    """The x-served-by of a replica: host name and port, by default."""
    return f"{HOST}:{process.address.rsplit(':', 1)[1]}"


async def say_hello(stub) -> str:
    """One SayHello that must succeed; the replica that served it."""
    call = stub.SayHello(Request(name="Ada"), timeout=5)
    await call
    return served_by(await call.trailing_metadata())


async def spread(stub, calls: int) -> collections.Counter:
    return collections.Counter([await say_hello(stub) for _ in range(calls)])


async def until_every_replica_answers(stub, replicas: set[str]) -> None:
    """Calls until each of `replicas` has served one: the channel has connected to all."""
    seen: set[str] = set()

    async def all_seen() -> bool:
        seen.add(await say_hello(stub))
        return seen >= replicas

    await eventually(all_seen, message=f"calls served by each of {replicas}")


@pytest.fixture
def three_greeters():
    """Three Greeter replicas (and a Logger), each draining 1 s before it stops: the time
    a client needs to see NOT_SERVING (a health Watch tells it within milliseconds)."""
    with StepServices(
        STEP_DIR,
        replicas={"greeter": 3},
        args={"greeter": ("--drain-delay", "1")},
        # Below the kernel's ephemeral range: the replica the restart test stops can come
        # back at its address (no outgoing connection can be given the port meanwhile).
        ports={"greeter-2": free_port()},
        # The Logger gets all the time it needs: the tests count entries, and on a loaded
        # machine a report can take longer than the default 0.5 s (and be left out).
        env={"GREETER_LOGGER_TIMEOUT": "5"},
    ) as services:
        yield services


@pytest.mark.parametrize("scheme", ["ipv4", "ipv6"])
async def test_an_address_list_passes_the_tls_name_check_and_reaches_every_replica(
    start_server, scheme
):
    """TLS checks the name of the list's first host ("127.0.0.1", "::1" without brackets)
    against each replica's certificate, which names both (and not 127.0.0.2, where the
    second IPv4 replica listens)."""
    hosts = ["127.0.0.1", "127.0.0.2"] if scheme == "ipv4" else ["::1", "::1"]
    replicas = [
        await start_server(host=host, replica_name=f"replica-{n}")
        for n, host in enumerate(hosts, start=1)
    ]
    target = f"{scheme}:" + ",".join(replica.address for replica in replicas)
    async with balanced_channel(target) as channel:
        stub = greeter_pb2_grpc.GreeterStub(channel)
        await until_every_replica_answers(stub, {"replica-1", "replica-2"})


def test_a_balanced_channel_waits_at_most_5_s_between_reconnects():
    """gRPC's own cap is 120 s: a replica back after a long outage would get no call for up
    to two minutes. (Read from the options: waiting out a real backoff that grows past 5 s
    takes half a minute.)"""
    options = dict(channel_options("ipv4:127.0.0.1:50051,127.0.0.1:50061"))
    assert options["grpc.max_reconnect_backoff_ms"] == 5000


async def test_every_reply_names_the_replica_that_served_it():
    with ServerProcess(STEP_DIR, env={"GREETER_REPLICA_NAME": "greeter-a"}) as named:
        async with balanced_channel(named.address) as channel:
            assert await say_hello(greeter_pb2_grpc.GreeterStub(channel)) == "greeter-a"
    with ServerProcess(STEP_DIR) as unnamed:
        async with balanced_channel(unnamed.address) as channel:
            assert await say_hello(greeter_pb2_grpc.GreeterStub(channel)) == replica_of(unnamed)


async def test_calls_spread_evenly_over_three_replicas(three_greeters):
    """Round robin takes the replicas in turn: once all three are connected, 30 calls give
    10 each. The tolerance of one call covers a replica whose health stream is re-opened
    during the run (it is skipped for that one turn)."""
    replicas = {replica_of(p) for p in three_greeters.replicas("greeter")}
    async with balanced_channel(three_greeters.targets["greeter"]) as channel:
        stub = greeter_pb2_grpc.GreeterStub(channel)
        await until_every_replica_answers(stub, replicas)
        counts = await spread(stub, 30)
    assert set(counts) == replicas
    assert all(9 <= n <= 11 for n in counts.values()), counts


async def test_a_replica_reporting_not_serving_gets_no_new_calls(three_greeters):
    """A fourth replica gets SIGTERM with a long drain: it says NOT_SERVING and keeps
    serving for 30 s, but the client sends it nothing new."""
    with ServerProcess(STEP_DIR, "--drain-delay", "30") as draining:
        target = f"{three_greeters.targets['greeter']},{draining.address}"
        replicas = {replica_of(p) for p in [*three_greeters.replicas("greeter"), draining]}
        async with balanced_channel(target) as channel:
            stub = greeter_pb2_grpc.GreeterStub(channel)
            await until_every_replica_answers(stub, replicas)
            draining.process.send_signal(signal.SIGTERM)
            await eventually(
                lambda: "health: NOT_SERVING" in draining.output, message="NOT_SERVING"
            )

            # The client learns it from its health Watch: wait until a full round skips it.
            async def skipped() -> bool:
                return replica_of(draining) not in await spread(stub, 4)

            await eventually(skipped, message="a round without the draining replica")
            counts = await spread(stub, 30)
            # Its Watch stayed open, NOT_SERVING: the client did not open new ones in a loop.
            watches = value(
                await scrape(draining.addresses["metrics"]),
                "grpc_server_started_total",
                grpc_service="grpc.health.v1.Health",
                grpc_method="Watch",
                grpc_type="server_stream",
            )
        still_up = draining.process.poll() is None
        draining.process.kill()  # not 30 s of drain in a test
        assert replica_of(draining) not in counts, counts
        assert sum(counts.values()) == 30
        assert watches == 1, f"{watches:.0f} Watch calls from one channel"
        assert still_up, "it was still up, serving, all along"


async def test_sigterm_under_a_steady_load_fails_no_call_and_loses_no_entry(three_greeters):
    """8 callers call without pause; one replica gets SIGTERM. Health says NOT_SERVING, the
    clients stop picking it, it drains for 1 s, finishes what it has and exits 0: not one
    call fails, the other two take its share, and the Logger has an entry for every
    greeting (its Record count, from its /metrics)."""
    victim = three_greeters["greeter-2"]
    results: collections.Counter = collections.Counter()
    stop = asyncio.Event()

    async def caller(stub) -> None:
        while not stop.is_set():
            try:
                results[await say_hello(stub)] += 1
            except grpc.aio.AioRpcError as error:
                results[f"failed: {error.code().name}"] += 1

    async with balanced_channel(three_greeters.targets["greeter"]) as channel:
        stub = greeter_pb2_grpc.GreeterStub(channel)
        callers = [asyncio.create_task(caller(stub)) for _ in range(8)]
        await eventually(lambda: results[replica_of(victim)] >= 20, message="load on all")
        exit_code = await asyncio.to_thread(victim.stop)  # SIGTERM, and its exit
        after = sum(results.values())
        await eventually(lambda: sum(results.values()) >= after + 100, message="more calls")
        stop.set()
        await asyncio.gather(*callers)
    failed = sum(n for key, n in results.items() if key.startswith("failed"))
    made = sum(results.values())
    logger = three_greeters["logger"].addresses["metrics"]
    recorded = value(
        await scrape(logger),
        "grpc_server_handled_total",
        grpc_type="unary",
        grpc_service="logger.v1.Logger",
        grpc_method="Record",
        grpc_code="OK",
    )
    print(f"FIGURES calls={made} failed={failed} entries_lost={made - failed - recorded}")
    assert exit_code == 0
    assert failed == 0, results
    assert recorded == made, "every greeting has its entry"
    assert "stopped" in victim.output


async def test_a_restarted_replica_gets_calls_again(three_greeters):
    victim = three_greeters["greeter-2"]
    port = victim.address.rsplit(":", 1)[1]
    async with balanced_channel(three_greeters.targets["greeter"]) as channel:
        stub = greeter_pb2_grpc.GreeterStub(channel)
        await until_every_replica_answers(
            stub, {replica_of(p) for p in three_greeters.replicas("greeter")}
        )
        assert await asyncio.to_thread(victim.stop) == 0
        assert replica_of(victim) not in await spread(stub, 10)  # the others answer all
        with ServerProcess(STEP_DIR, "--port", port) as restarted:

            async def served_again() -> bool:
                return replica_of(restarted) in await spread(stub, 3)

            # The channel reconnects within its backoff (at most 5 s, balancing.py).
            await eventually(served_again, timeout=15, message="a call to the restarted one")


def test_all_replicas_down_is_one_clear_unavailable_error_fast():
    with closed_port() as a, closed_port() as b, closed_port() as c:
        started = time.monotonic()
        result = run_client("hello", "--name", "Ada", "--target", f"ipv4:{a},{b},{c}")
        elapsed = time.monotonic() - started
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("error: UNAVAILABLE: ")
    assert elapsed < 4, f"{elapsed:.1f}s: the client waited for its 5 s deadline"


def test_a_dns_target_resolves_to_the_replicas_behind_a_name(server_process):
    """dns:///localhost:PORT, the form of a Kubernetes headless service. localhost may also
    resolve to ::1, where nothing listens: that address is skipped."""
    port = server_process.address.rsplit(":", 1)[1]
    result = run_client("hello", "--name", "Ada", "--target", f"dns:///localhost:{port}")
    assert (result.returncode, result.stdout) == (0, "Hello, Ada!\n"), result.stderr


def test_the_cli_spreads_its_calls_and_counts_them(three_greeters):
    """`spread` counts the calls each replica served. Round robin uses the replicas it is
    connected to: on a loaded machine the third connection's TLS handshake may still be
    under way when 30 calls are done (once in CI), and two replicas share them."""
    result = run_client(
        "spread", "--name", "Ada", "--calls", "30", "--target", three_greeters.targets["greeter"]
    )
    assert result.returncode == 0, result.stderr
    *counts, summary = result.stdout.splitlines()
    assert len(counts) in (2, 3), result.stdout
    assert summary == f"30 calls over {len(counts)} replicas"
    assert sum(int(line.rsplit(": ", 1)[1]) for line in counts) == 30


async def test_the_greeter_spreads_its_reports_over_two_loggers():
    with StepServices(STEP_DIR, replicas={"logger": 2}) as services:
        loggers = services.replicas("logger")
        async with open_channel(services["greeter"].address) as channel:
            stub = greeter_pb2_grpc.GreeterStub(channel)

            async def both_loggers_used() -> bool:
                await say_hello(stub)
                entries = [await logged_greetings(p.address) for p in loggers]
                return all(entries)

            await eventually(both_loggers_used, message="an entry at each Logger")
            before = [len(await logged_greetings(p.address)) for p in loggers]
            for _ in range(20):
                await say_hello(stub)
            after = [len(await logged_greetings(p.address)) for p in loggers]
    shares = [a - b for a, b in zip(after, before, strict=True)]
    assert sum(shares) == 20
    assert all(9 <= share <= 11 for share in shares), shares  # round robin: 10 each


def test_a_list_of_addresses_without_its_scheme_is_refused_with_what_to_write():
    addresses = "127.0.0.1:1,127.0.0.1:2"  # gRPC alone: "Misformatted domain name", later
    client = run_client("hello", "--name", "Ada", "--target", addresses)
    greeter = run_script(
        STEP_DIR, "server.py", "--port", "0", env={"GREETER_LOGGER_TARGET": addresses}
    )
    for result in (client, greeter):
        assert result.returncode == 2
        assert result.stderr.endswith(
            f"'{addresses}': a list of addresses needs ipv4: before it: ipv4:HOST:PORT,HOST:PORT\n"
        ), result.stderr
