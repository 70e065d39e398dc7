"""The canary through a real Envoy, with deploy/envoy.yaml (tools/envoy.py changes only its
ports and upstream addresses): two replicas of the previous release (GREETER_SERVE_V2=false),
one of the new, as docker-compose.yml runs them. Every call says which replica served it
(x-served-by), so the tests count where Envoy sent each one."""

import asyncio
import collections
import signal
import subprocess
import time
from dataclasses import dataclass, field

import grpc
import pytest
import yaml

from balancing import served_by
from greeter.v1 import greeter_pb2_grpc
from greeter.v2 import greeter_pb2 as v2
from greeter.v2 import greeter_pb2_grpc as v2_grpc
from helpers import (
    CERTS,
    STEP_DIR,
    UNREACHED_EDGE_BUCKET,
    Request,
    binomial_bounds,
    open_channel,
    releases_behind_envoy,
    rpc_error,
    run_client,
)
from tests.support.helpers import eventually
from tools.envoy import RELEASES, EnvoyProcess, envoy_binary

*STABLE, CANARY = (settings["GREETER_REPLICA_NAME"] for settings in RELEASES.values())
# The canary drains this long after SIGTERM (health NOT_SERVING, still serving): longer
# than Envoy takes to notice, one health check interval (1 s) plus its timeout (1 s).
CANARY_DRAIN_DELAY = 3


def test_binomial_bounds_by_hand():
    # 10 fair coin flips, 1% risk: P(0 heads) = P(10) = 1/1024 fits in each 0.5% tail, but
    # P(at most 1) = 11/1024 does not.
    assert binomial_bounds(10, 0.5, risk=0.01) == (1, 9)
    # 1,000 calls at 10%: mean 100, standard deviation 9.5; the bounds sit ~4.9 of them
    # away, a little wider above (the distribution leans right).
    assert binomial_bounds(1000, 0.1) == (57, 149)


@pytest.fixture
def releases(request):
    """The releases and Envoy. The canary's drain delay is 0 unless the test asks for one
    (parametrize `releases` indirectly): each second of it is a second of teardown."""
    drain_delay = getattr(request, "param", 0)
    with releases_behind_envoy(canary_env={"GREETER_DRAIN_DELAY": str(drain_delay)}) as releases:
        yield releases


@pytest.fixture
async def envoy_channel(releases):
    async with open_channel(releases.envoy.address) as channel:
        yield channel


async def greet(stub, metadata=()) -> str:
    """One SayHello through Envoy; which replica served it."""
    call = stub.SayHello(Request(name="Ada"), metadata=metadata, timeout=10)
    await call
    return served_by(await call.trailing_metadata())


async def count_served(stub, calls: int, metadata=(), concurrency: int = 20) -> collections.Counter:
    """`calls` SayHello calls, `concurrency` at a time: how many each replica served. A
    failed call fails the test."""
    counts: collections.Counter[str] = collections.Counter()
    remaining = iter(range(calls))

    async def worker():
        for _ in remaining:
            counts[await greet(stub, metadata)] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return counts


def on_canary(counts: collections.Counter) -> int:
    return counts[CANARY]


@dataclass
class SteadyCallers:
    """Callers greeting through Envoy without a pause while a test changes something: each
    call's start time, and who served it or the status it failed with."""

    stub: greeter_pb2_grpc.GreeterStub
    callers: int = 4
    results: list[tuple[float, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    async def _call_forever(self) -> None:
        while True:
            started = time.monotonic()
            try:
                self.results.append((started, await greet(self.stub)))
            except grpc.aio.AioRpcError as err:
                self.failures.append(f"{err.code().name}: {err.details()}")

    async def __aenter__(self) -> "SteadyCallers":
        self._tasks = [asyncio.create_task(self._call_forever()) for _ in range(self.callers)]
        await eventually(lambda: len(self.results) >= 20, timeout=10, message="steady calls")
        return self

    async def __aexit__(self, *exc) -> None:
        for task in self._tasks:
            task.cancel()
        ended = await asyncio.gather(*self._tasks, return_exceptions=True)
        # A caller that stopped early, on an exception other than a failed call, is a bug here.
        assert all(isinstance(e, asyncio.CancelledError) for e in ended), ended

    def served_since(self, moment: float) -> collections.Counter:
        return collections.Counter(who for started, who in self.results if started > moment)


def test_envoy_accepts_the_config(tmp_path):
    """`envoy --mode validate` reads the file compose runs, as it is: every field known,
    every referenced file there (certs/, from the step folder)."""
    (tmp_path / "certs").symlink_to(CERTS)
    (tmp_path / "deploy").symlink_to(STEP_DIR / "deploy")  # the API's descriptors, the page
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(STEP_DIR / "deploy" / "envoy.yaml")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr


def test_envoy_retries_only_what_never_reached_a_handler():
    """Every route's retry policy: a refused connection or stream, or UNAVAILABLE (the
    canary draining), never INTERNAL or another code a handler sends after it may have done
    its work; two retries, each on another host."""
    config = yaml.safe_load((STEP_DIR / "deploy" / "envoy.yaml").read_text())
    [listener] = config["static_resources"]["listeners"]
    [chain] = listener["filter_chains"]
    [manager] = chain["filters"]
    [host] = manager["typed_config"]["route_config"]["virtual_hosts"]
    # Every route to the Greeters retries (the page, step 19, is Envoy's own answer).
    routes = [r["route"] for r in host["routes"] if "route" in r]
    policies = [route["retry_policy"] for route in routes if "retry_policy" in route]
    assert len(policies) == len(routes) == 3
    for policy in policies:
        assert policy["retry_on"].split(",") == ["connect-failure", "refused-stream", "unavailable"]
        assert policy["num_retries"] == 2


async def test_v1_calls_split_90_10_between_stable_and_canary(envoy_channel):
    counts = await count_served(greeter_pb2_grpc.GreeterStub(envoy_channel), 1000)
    assert sum(counts.values()) == 1000
    low, high = binomial_bounds(1000, 0.10)
    print(f"split of 1000: {dict(sorted(counts.items()))}")  # shown with pytest -s
    assert low <= on_canary(counts) <= high, counts
    # Round robin inside the stable release: both replicas share its 90%.
    stable = [counts[name] for name in STABLE]
    assert all(count > 0 for count in stable), counts
    assert abs(stable[0] - stable[1]) <= 20, counts


async def test_the_canary_header_sends_every_call_to_the_canary(envoy_channel):
    stub = greeter_pb2_grpc.GreeterStub(envoy_channel)
    counts = await count_served(stub, 100, metadata=(("x-canary", "always"),))
    assert counts == {CANARY: 100}
    # Any other value is an ordinary call.
    others = await count_served(stub, 200, metadata=(("x-canary", "never"),))
    assert sum(others[name] for name in STABLE) > 100, others


async def test_v2_calls_reach_only_the_canary(envoy_channel):
    stub = v2_grpc.GreeterServiceStub(envoy_channel)
    counts: collections.Counter[str] = collections.Counter()
    for _ in range(50):
        call = stub.SayHello(v2.SayHelloRequest(person=v2.Person(given_name="Ada")), timeout=10)
        assert (await call).message == "Hello, Ada!"
        counts[served_by(await call.trailing_metadata())] += 1
    assert counts == {CANARY: 50}


async def test_client_streams_are_routed_as_every_other_call(envoy_channel):
    """Envoy routes by path, whatever the RPC kind: a v1 GreetMany call with the canary
    header, and a v2 one, reach the canary with every name they sent."""
    names = iter([Request(name="Ada"), Request(name="Grace")])
    v1_call = greeter_pb2_grpc.GreeterStub(envoy_channel).GreetMany(
        names, metadata=(("x-canary", "always"),), timeout=10
    )
    assert (await v1_call).message == "Hello, Ada and Grace!"
    assert served_by(await v1_call.trailing_metadata()) == CANARY
    people = iter([v2.GreetManyRequest(person=v2.Person(given_name="Ada"))])
    v2_call = v2_grpc.GreeterServiceStub(envoy_channel).GreetMany(people, timeout=10)
    assert (await v2_call).message == "Hello, Ada!"
    assert served_by(await v2_call.trailing_metadata()) == CANARY


@pytest.mark.parametrize("releases", [CANARY_DRAIN_DELAY], indirect=True, ids=["draining"])
async def test_a_canary_that_stops_serving_costs_no_v1_call(releases, envoy_channel):
    """SIGTERM to the canary, as a rollback or a rolling update does: it reports NOT_SERVING
    and keeps serving for its drain delay. Envoy's health check sees it, and the canary's
    share goes to the stable release (the canary cluster's priority 1): v1 callers see
    nothing but another x-served-by. v2 callers, once the canary has gone, get UNAVAILABLE:
    no other release serves v2. (step 17's README, "When the canary is not serving".)"""
    stub = greeter_pb2_grpc.GreeterStub(envoy_channel)
    v2_stub = v2_grpc.GreeterServiceStub(envoy_channel)
    request = v2.SayHelloRequest(person=v2.Person(given_name="Ada"))
    canary_address = releases.canary.address
    async with SteadyCallers(stub) as callers:
        releases.canary.process.send_signal(signal.SIGTERM)
        await eventually(
            lambda: not releases.envoy.healthy("canary_hosts")[canary_address],
            timeout=CANARY_DRAIN_DELAY,
            message="Envoy to see the canary NOT_SERVING",
        )
        noticed = time.monotonic()
        # Envoy has no other replica for v2: the draining canary still serves it.
        v2_reply = await v2_stub.SayHello(request, timeout=10)
        assert v2_reply.message == "Hello, Ada!"
        assert releases.canary.process.poll() is None, "noticed while the canary still serves"
        assert on_canary(await count_served(stub, 200)) == 0
        header = await count_served(stub, 20, metadata=(("x-canary", "always"),))
        assert on_canary(header) == 0 and sum(header.values()) == 20
        await asyncio.to_thread(releases.canary.process.wait, 20)
        assert releases.canary.process.returncode == 0
        after_exit = await count_served(stub, 200)
        assert on_canary(after_exit) == 0 and sum(after_exit.values()) == 200
    print(
        f"canary stopped: {len(callers.results)} steady calls, "
        f"{callers.served_since(noticed).total()} after Envoy noticed, "
        f"{len(callers.failures)} failed"
    )
    assert callers.failures == []
    assert on_canary(callers.served_since(noticed)) == 0
    assert on_canary(collections.Counter(who for _, who in callers.results)) > 0, "before"

    error = await rpc_error(v2_stub.SayHello(request, timeout=10))
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
    print(f"v2 after the canary exited: UNAVAILABLE: {error.details()}")


async def test_promoting_the_canary_fails_no_call(releases, envoy_channel):
    """The weights move at run time (Envoy's runtime, POST /runtime_modify): 50/50, then
    0/100, while callers keep calling. No call fails, and each split is what was asked."""
    stub = greeter_pb2_grpc.GreeterStub(envoy_channel)
    async with SteadyCallers(stub) as callers:
        releases.envoy.set_weights(stable=50, canary=50)
        half = await count_served(stub, 400)
        low, high = binomial_bounds(400, 0.5)
        assert low <= on_canary(half) <= high, half
        releases.envoy.set_weights(stable=0, canary=100)
        promoted = time.monotonic()
        assert await count_served(stub, 200) == {CANARY: 200}
        await eventually(
            lambda: callers.served_since(promoted).total() >= 20, timeout=10, message="more calls"
        )
    print(
        f"promotion: 50/50 gave the canary {on_canary(half)} of 400; "
        f"{len(callers.results)} steady calls, {len(callers.failures)} failed"
    )
    assert callers.failures == []
    assert set(callers.served_since(promoted)) == {CANARY}


def test_the_client_through_envoy(releases):
    """What the README shows: client.py pointed at Envoy, with --canary and --api v2."""
    target = ("--target", releases.envoy.address)
    v2 = run_client("hello", "--api", "v2", "--name", "Ada", "--family-name", "Lovelace", *target)
    assert (v2.returncode, v2.stdout, v2.stderr) == (0, "Hello, Ada Lovelace!\n", "")
    canary = run_client("spread", "--name", "Ada", "--calls", "20", "--canary", *target)
    assert canary.stdout == "canary: 20\n20 calls over 1 replicas\n", canary.stderr
    # Straight to a replica of the previous release, bypassing Envoy: it has no v2.
    stable = run_client(
        "hello", "--api", "v2", "--name", "Ada", "--target", releases.stable[0].address
    )
    assert stable.returncode == 1
    assert stable.stderr.startswith("error: UNIMPLEMENTED: "), stable.stderr
    wrong = run_client("hello", "--name", "Ada", "--family-name", "Lovelace", *target)
    assert wrong.returncode == 2 and "--family-name needs --api v2" in wrong.stderr


async def test_callers_come_back_after_envoy_restarts(releases):
    """Envoy killed (SIGKILL: a crash, no drain): a call fails at once with UNAVAILABLE, it
    does not hang. Envoy started again on its port: the same channel's calls succeed again,
    without the caller doing anything."""
    envoy = releases.envoy
    async with open_channel(envoy.address) as channel:
        stub = greeter_pb2_grpc.GreeterStub(channel)
        assert await greet(stub)
        envoy.process.kill()
        envoy.process.wait()
        error = await rpc_error(stub.SayHello(Request(name="Ada"), timeout=5))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        with EnvoyProcess(
            STEP_DIR,
            CERTS,
            releases.upstreams,
            port=envoy.port,
            admin_port=envoy.admin_port,
            user_bucket=UNREACHED_EDGE_BUCKET,
        ):

            async def served() -> bool:
                try:
                    return bool(await greet(stub))
                except grpc.aio.AioRpcError:
                    return False  # the channel is still backing off before it reconnects

            await eventually(served, timeout=15, interval=0.2, message="a call through Envoy")
            counts = await count_served(stub, 100)
            assert counts.total() == 100
