"""Rebalancing after a scale-up, with real processes and a real DNS server: a client of
`dns:///greeters` (a Kubernetes headless Service's name) spreads its calls over two Greeter
replicas; a third one is started and added to the name's DNS answer, as Kubernetes adds a
ready pod to a headless Service. With a maximum connection age on the servers
(rebalancing.py) the client's calls reach the new replica within that age, and no call
fails; without it, the new replica gets none.

The DNS server is dnslib's, on loopback; gRPC's target names it (`dns://HOST:PORT/NAME`),
so no system resolver is involved. The replicas listen on one port at 127.0.0.2, .3 and .4,
as pods do on their own IP addresses, and their certificate names `greeters`.
"""

import asyncio
import time

import pytest
from dnslib import QTYPE, RR, A
from dnslib.server import BaseResolver, DNSServer

from balancing import channel_options, served_by
from greeter.v1 import greeter_pb2_grpc
from helpers import STEP_DIR, Request, open_channel
from tests.support.helpers import eventually
from tools.processes import ServerProcess, free_port

NAME = "greeters"  # in the servers' certificate (gen_certs.sh), as a Service's name would be
AGE_SECONDS = 2.0


class Replicas(BaseResolver):
    """A DNS server's answers: an A record per ready replica, for NAME only."""

    def __init__(self):
        self.addresses: list[str] = []

    def resolve(self, request, handler):
        reply = request.reply()
        if str(request.q.qname).rstrip(".") == NAME and request.q.qtype == QTYPE.A:
            for address in list(self.addresses):
                reply.add_answer(RR(NAME, QTYPE.A, rdata=A(address), ttl=1))
        return reply


@pytest.fixture
def dns():
    """A DNS server on a free loopback port, and the gRPC target that asks it for NAME."""
    replicas = Replicas()
    server = DNSServer(replicas, port=0, address="127.0.0.1")
    server.start_thread()
    try:
        yield replicas, server.server.server_address[1]
    finally:
        server.stop()
        server.server.server_close()


def start_replica(host: str, port: int, age: float) -> ServerProcess:
    return ServerProcess(
        STEP_DIR,
        "--port",
        str(port),
        env={
            "GREETER_HOST": host,
            "GREETER_REPLICA_NAME": host,
            "GREETER_MAX_CONNECTION_AGE": str(age),
            "GREETER_LOG_LEVEL": "WARNING",
        },
    )


async def calls_after_a_scale_up(dns, age: float, watch_seconds: float):
    """Two replicas, then a third: the replica of each call after the third was added (and
    how many seconds after), and every call's failure."""
    replicas, dns_port = dns
    port = free_port()
    started = []
    try:
        for host in ("127.0.0.2", "127.0.0.3"):
            started.append(start_replica(host, port, age))
            replicas.addresses.append(host)
        target = f"dns://127.0.0.1:{dns_port}/{NAME}:{port}"
        failures: list[str] = []
        after: list[tuple[float, str]] = []
        async with open_channel(target, options=channel_options(target)) as channel:
            stub = greeter_pb2_grpc.GreeterStub(channel)

            async def call() -> str:
                try:
                    request = stub.SayHello(Request(name="Ada"), timeout=5)
                    await request
                    return served_by(await request.trailing_metadata())
                except Exception as err:  # every failure is counted
                    failures.append(repr(err))
                    return ""

            seen: set[str] = set()

            async def both_serve() -> bool:
                seen.add(await call())
                return seen >= {"127.0.0.2", "127.0.0.3"}

            await eventually(both_serve, message="calls served by both replicas")
            # The scale-up: the pod starts, and once ready its address joins the answer.
            started.append(start_replica("127.0.0.4", port, age))
            replicas.addresses.append("127.0.0.4")
            added = time.monotonic()
            while (elapsed := time.monotonic() - added) < watch_seconds:
                after.append((elapsed, await call()))
                await asyncio.sleep(0.01)  # a steady load, not a loop as fast as it goes
        return after, failures
    finally:
        for process in started:
            process.stop()


async def test_a_new_replica_gets_calls_within_the_connection_age_and_no_call_fails(dns):
    after, failures = await calls_after_a_scale_up(dns, AGE_SECONDS, watch_seconds=5 * AGE_SECONDS)
    assert failures == []
    on_the_new_one = [elapsed for elapsed, replica in after if replica == "127.0.0.4"]
    assert on_the_new_one, f"no call reached the new replica in {len(after)} calls"
    # The age (gRPC adds up to 10%), a re-resolution (at most 1 s apart), a TLS handshake.
    assert on_the_new_one[0] < AGE_SECONDS * 1.1 + 4
    # ... and from then on it takes its share: the calls of the last age go to all three.
    last = {replica for elapsed, replica in after if elapsed > 4 * AGE_SECONDS}
    assert last == {"127.0.0.2", "127.0.0.3", "127.0.0.4"}


async def test_without_a_connection_age_a_new_replica_gets_no_calls(dns):
    """The trap this step defuses: the channel keeps its two connections and never asks
    DNS again, so a scale-up changes nothing for a client already running."""
    after, failures = await calls_after_a_scale_up(dns, 3600, watch_seconds=4 * AGE_SECONDS)
    assert failures == []
    assert {replica for _, replica in after} == {"127.0.0.2", "127.0.0.3"}
