"""Prometheus metrics: the go-grpc-prometheus series, names, labels and Go code names, for
every RPC kind and outcome; /metrics on its own port; the deploy/ files checked by promtool;
and a real Prometheus scraping the real server process."""

import asyncio
import contextlib
import gzip
import socket
import subprocess
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from greeter.v1 import greeter_pb2_grpc
from helpers import (
    STEP_DIR,
    Request,
    WritingGreeter,
    messages,
    open_channel,
    rpc_error,
    run_client,
    say,
    scrape,
    value,
)
from metrics import GO_DEFAULT_BUCKETS, MAX_REQUEST_BYTES
from service import MAX_GREET_MANY_NAMES, Greeter
from settings import parse_settings
from tests.support.helpers import closed_port, eventually, require_binary
from tools.processes import StepServices, run_script
from tools.prometheus import INSTALL_HINT, PrometheusProcess

GREETER = "greeter.v1.Greeter"
DEPLOY = STEP_DIR / "deploy"


def rpc(kind: str, method: str, service: str = GREETER) -> dict[str, str]:
    return {"grpc_type": kind, "grpc_service": service, "grpc_method": method}


async def test_unary_outcomes_are_counted_with_go_code_names(start_server):
    server = await start_server()
    async with (
        open_channel(server.address) as channel,
        open_channel(server.address, token=None) as anonymous,
    ):
        stub = greeter_pb2_grpc.GreeterStub(channel)
        for _ in range(2):
            await stub.SayHello(Request(name="Ada"), timeout=5)
        await rpc_error(stub.SayHello(Request(name=""), timeout=5))
        await rpc_error(greeter_pb2_grpc.GreeterStub(anonymous).SayHello(Request(name="Ada")))
    hello = rpc("unary", "SayHello")

    handled = "grpc_server_handled_total"

    async def counted() -> bool:
        # An error can reach the client before the server has counted it: grpc.aio's abort
        # sends the status at once, and the interceptor counts when the handler has raised.
        samples = await scrape(server.metrics_address)
        codes = ("OK", "InvalidArgument", "Unauthenticated")
        return sum(value(samples, handled, **hello, grpc_code=code) or 0 for code in codes) == 4

    await eventually(counted, message="4 handled calls")
    samples = await scrape(server.metrics_address)
    assert value(samples, "grpc_server_started_total", **hello) == 4
    assert value(samples, handled, **hello, grpc_code="OK") == 2
    assert value(samples, handled, **hello, grpc_code="InvalidArgument") == 1
    assert value(samples, handled, **hello, grpc_code="Unauthenticated") == 1
    assert value(samples, "grpc_server_msg_received_total", **hello) == 4
    assert value(samples, "grpc_server_msg_sent_total", **hello) == 2  # errors send no reply
    assert value(samples, "grpc_server_handling_seconds_count", **hello) == 4


@pytest.mark.parametrize("greeter", [Greeter, WritingGreeter], ids=["yielded", "written"])
async def test_streams_and_chats_count_their_messages(start_server, greeter):
    server = await start_server(greeter, stream_interval=0.01)
    async with open_channel(server.address) as channel:
        stub = greeter_pb2_grpc.GreeterStub(channel)
        await messages(stub.StreamGreetings(Request(name="Ada", count=3), timeout=5))
        names = [Request(name=name) for name in ("Ada", "Grace", "Alan", "Edsger")]
        await stub.GreetMany(iter(names), timeout=5)
        chat = stub.Chat(timeout=5)
        for name in ("Ada", "Grace"):
            await say(chat, name)
        await chat.done_writing()
        assert await chat.read() is grpc.aio.EOF
    stream, bidi = rpc("server_stream", "StreamGreetings"), rpc("bidi_stream", "Chat")
    many = rpc("client_stream", "GreetMany")

    async def all_handled() -> bool:
        samples = await scrape(server.metrics_address)
        return all(
            value(samples, "grpc_server_handled_total", **labels, grpc_code="OK") == 1
            for labels in (stream, many, bidi)
        )

    await eventually(all_handled, message="the stream, the GreetMany call and the chat handled")
    samples = await scrape(server.metrics_address)
    assert value(samples, "grpc_server_msg_received_total", **stream) == 1
    assert value(samples, "grpc_server_msg_sent_total", **stream) == 3
    assert value(samples, "grpc_server_msg_received_total", **many) == 4
    assert value(samples, "grpc_server_msg_sent_total", **many) == 1
    assert value(samples, "grpc_server_msg_received_total", **bidi) == 2
    assert value(samples, "grpc_server_msg_sent_total", **bidi) == 2


@pytest.mark.parametrize("greeter", [Greeter, WritingGreeter], ids=["yielded", "written"])
async def test_a_cancelled_stream_and_one_past_its_deadline_are_counted(start_server, greeter):
    server = await start_server(greeter, stream_interval=0.1)
    async with open_channel(server.address) as channel:
        stub = greeter_pb2_grpc.GreeterStub(channel)
        call = stub.StreamGreetings(Request(name="Ada", count=10), timeout=10)
        await call.read()
        call.cancel()
        late = stub.StreamGreetings(Request(name="Ada", count=10), timeout=0.25)
        assert (await rpc_error(messages(late))).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stream = rpc("server_stream", "StreamGreetings")

    async def cancelled_and_late() -> bool:
        samples = await scrape(server.metrics_address)
        counts = [
            value(samples, "grpc_server_handled_total", **stream, grpc_code=code)
            for code in ("Canceled", "DeadlineExceeded", "OK")
        ]
        return counts == [1, 1, 0]

    await eventually(cancelled_and_late, message="one Canceled and one DeadlineExceeded")


async def test_health_and_reflection_calls_are_counted_too(start_server):
    server = await start_server()
    async with open_channel(server.address, token=None) as probe:
        await health_pb2_grpc.HealthStub(probe).Check(health_pb2.HealthCheckRequest(), timeout=5)
        listing = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = reflection_pb2_grpc.ServerReflectionStub(probe).ServerReflectionInfo(
            iter([listing]), timeout=5
        )
        [reply] = [r async for r in replies]
        assert reply.list_services_response.service
    check = rpc("unary", "Check", "grpc.health.v1.Health")
    reflect = rpc("bidi_stream", "ServerReflectionInfo", "grpc.reflection.v1alpha.ServerReflection")

    async def counted() -> bool:
        samples = await scrape(server.metrics_address)
        return (
            value(samples, "grpc_server_handled_total", **check, grpc_code="OK") == 1
            and value(samples, "grpc_server_handled_total", **reflect, grpc_code="OK") == 1
            and value(samples, "grpc_server_msg_received_total", **reflect) == 1
        )

    await eventually(counted, message="the health check and the reflection stream to be counted")


async def test_the_calls_to_the_logger_are_counted_as_client_calls(start_server):
    """The Greeter's own calls (to the Logger), as go-grpc-prometheus's client metrics."""
    server = await start_server()
    async with open_channel(server.address) as channel:
        stub = greeter_pb2_grpc.GreeterStub(channel)
        for name in ("Ada", "Grace", "Alan"):
            await stub.SayHello(Request(name=name), timeout=5)
        await rpc_error(stub.SayHello(Request(name=""), timeout=5))  # no greeting, no call
    samples = await scrape(server.metrics_address)
    record = rpc("unary", "Record", "logger.v1.Logger")
    assert value(samples, "grpc_client_started_total", **record) == 3
    assert value(samples, "grpc_client_handled_total", grpc_code="OK", **record) == 3
    assert value(samples, "grpc_client_msg_sent_total", **record) == 3
    assert value(samples, "grpc_client_msg_received_total", **record) == 3
    assert value(samples, "grpc_client_handling_seconds_count", **record) == 3
    listing = rpc("unary", "ListRecent", "logger.v1.Logger")  # never called: there, at 0
    assert value(samples, "grpc_client_handled_total", grpc_code="Unavailable", **listing) == 0


async def test_every_method_and_code_starts_at_zero(start_server):
    """As go-grpc-prometheus's InitializeMetrics: a rate over a series that only appears
    with its first call would miss that call."""
    samples = await scrape((await start_server()).metrics_address)
    for kind, service, method in [
        ("unary", GREETER, "SayHello"),
        ("server_stream", GREETER, "StreamGreetings"),
        ("client_stream", GREETER, "GreetMany"),
        ("bidi_stream", GREETER, "Chat"),
        ("unary", "grpc.health.v1.Health", "Check"),
        ("server_stream", "grpc.health.v1.Health", "Watch"),
        ("bidi_stream", "grpc.reflection.v1alpha.ServerReflection", "ServerReflectionInfo"),
    ]:
        labels = rpc(kind, method, service)
        assert value(samples, "grpc_server_started_total", **labels) == 0
        for code in ("OK", "Canceled", "InvalidArgument", "ResourceExhausted", "Unavailable"):
            assert value(samples, "grpc_server_handled_total", **labels, grpc_code=code) == 0
    assert not any(name.endswith("_created") for name, *_ in samples)


async def test_the_latency_histogram_has_go_default_buckets(start_server):
    samples = await scrape((await start_server()).metrics_address)
    buckets = {
        dict(labels)["le"]
        for name, *labels in samples
        if name == "grpc_server_handling_seconds_bucket"
        and dict(labels)["grpc_method"] == "SayHello"
    }
    assert buckets == {str(float(b)) for b in GO_DEFAULT_BUCKETS} | {"+Inf"}


async def test_metrics_answers_only_get_metrics(start_server):
    address = (await start_server()).metrics_address

    def status(path: str, method: str = "GET") -> int:
        request = urllib.request.Request(f"http://{address}{path}", method=method)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    assert await asyncio.to_thread(status, "/metrics") == 200
    assert await asyncio.to_thread(status, "/") == 404
    assert await asyncio.to_thread(status, "/metrics", "POST") == 405


async def test_metrics_answers_a_scrape_as_prometheus_asks_for_it(start_server):
    """Prometheus asks for OpenMetrics or the text format, gzipped (its request headers,
    scrape/scrape.go): each comes back as asked, with the same samples."""
    address = (await start_server()).metrics_address

    def fetch(accept: str, encoding: str) -> tuple[str, str, str]:
        request = urllib.request.Request(
            f"http://{address}/metrics", headers={"Accept": accept, "Accept-Encoding": encoding}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            body = response.read()
            gzipped = response.headers.get("Content-Encoding") == "gzip"
            text = (gzip.decompress(body) if gzipped else body).decode()
            return response.headers["Content-Type"], response.headers.get("Content-Encoding"), text

    openmetrics = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    kind, encoding, text = await asyncio.to_thread(fetch, openmetrics, "gzip")
    assert kind.startswith("application/openmetrics-text; version=1.0.0")
    assert encoding == "gzip"
    assert text.endswith("# EOF\n")  # OpenMetrics' end marker
    kind, encoding, plain = await asyncio.to_thread(fetch, "text/plain", "identity")
    assert kind.startswith("text/plain; version=0.0.4")
    assert encoding is None
    assert "# EOF" not in plain
    assert "grpc_server_started_total" in text and "grpc_server_started_total" in plain


async def test_metrics_hangs_up_on_an_oversized_request(start_server):
    """A request head bigger than MAX_REQUEST_BYTES is not read into memory: the connection
    is closed, and the endpoint goes on answering."""
    address = (await start_server()).metrics_address
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /metrics HTTP/1.1\r\nX-Junk: " + b"x" * (MAX_REQUEST_BYTES * 2))
    try:
        answer = await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:  # closed with our bytes unread: the kernel resets
        answer = b""
    assert answer == b""  # hung up, no reply
    writer.close()
    assert "grpc_server_started_total" in str(await scrape(address))


def test_metrics_port_comes_from_a_flag_or_the_environment():
    assert parse_settings(["--metrics-port", "9999"], environ={}).metrics_port == 9999
    assert parse_settings([], environ={"GREETER_METRICS_PORT": "9998"}).metrics_port == 9998
    assert parse_settings([], environ={}).metrics_port == 9464  # not 9090: Prometheus's own


def test_server_refuses_a_metrics_port_in_use():
    with closed_port() as address:
        port = address.rsplit(":", 1)[1]
        result = run_script(STEP_DIR, "server.py", "--port", "0", "--metrics-port", port)
    assert result.returncode == 1
    assert result.stderr == (
        f"error: cannot serve metrics on 127.0.0.1:{port}: Address already in use\n"
    )


def test_server_process_prints_its_metrics_address_and_promtool_accepts_its_output(server_process):
    promtool = require_binary("promtool", INSTALL_HINT)
    assert run_client("hello", "--name", "Ada", "--target", server_process.address).returncode == 0
    metrics_address = server_process.addresses["metrics"]
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert "grpc_server_handled_total{" in text
    check = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize(
    "command",
    [["check", "config", "prometheus.yml"], ["test", "rules", "alerts_test.yml"]],
    ids=["config", "alert-tests"],
)
def test_the_deploy_files_pass_promtool(command):
    promtool = require_binary("promtool", INSTALL_HINT)
    result = subprocess.run([promtool, *command], cwd=DEPLOY, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


async def test_a_real_prometheus_counts_every_outcome():
    """The real Greeter and Logger processes, scraped by a real Prometheus with
    deploy/prometheus.yml: after calls with known outcomes, PromQL returns exactly those
    counts, from both services."""
    require_binary("prometheus", INSTALL_HINT)
    with StepServices(STEP_DIR) as services:
        server, logger = services["greeter"], services["logger"]
        targets = {
            "greeter:9464": server.addresses["metrics"],
            "logger:9465": logger.addresses["metrics"],
        }
        with PrometheusProcess(DEPLOY, targets) as prometheus:
            await count_every_outcome(server, prometheus)


async def count_every_outcome(server, prometheus) -> None:
    """Calls with known outcomes, then the counts Prometheus must see."""
    async with (
        open_channel(server.address) as channel,
        open_channel(server.address, token=None) as anonymous,
    ):
        stub = greeter_pb2_grpc.GreeterStub(channel)
        for _ in range(3):
            await stub.SayHello(Request(name="Ada"), timeout=5)
        for _ in range(2):
            await rpc_error(stub.SayHello(Request(name=""), timeout=5))
        await rpc_error(greeter_pb2_grpc.GreeterStub(anonymous).SayHello(Request(name="A")))
        cancelled = stub.StreamGreetings(Request(name="Ada", count=10), timeout=10)
        await cancelled.read()
        cancelled.cancel()
        too_many = iter([Request(name="Ada")] * (MAX_GREET_MANY_NAMES + 1))
        await rpc_error(stub.GreetMany(too_many, timeout=5))
    expected = {
        ("SayHello", "unary", "OK"): 3,
        ("SayHello", "unary", "InvalidArgument"): 2,
        ("SayHello", "unary", "Unauthenticated"): 1,
        ("StreamGreetings", "server_stream", "Canceled"): 1,
        ("GreetMany", "client_stream", "ResourceExhausted"): 1,
        # The Logger: one entry per greeting made (the cancelled stream had made one).
        ("Record", "unary", "OK"): 4,
    }

    def handled() -> dict:
        result = prometheus.query(
            f'grpc_server_handled_total{{grpc_service=~"{GREETER}|logger.v1.Logger"}} > 0'
        )
        return {
            (r["metric"]["grpc_method"], r["metric"]["grpc_type"], r["metric"]["grpc_code"]): int(
                float(r["value"][1])
            )
            for r in result
        }

    seen: list[dict] = [{}]

    async def scraped() -> bool:
        seen[0] = await asyncio.to_thread(handled)
        return seen[0] == expected

    with contextlib.suppress(pytest.fail.Exception):  # the assert below shows the difference
        await eventually(scraped, timeout=30, message=f"Prometheus to see {expected}")
    assert seen[0] == expected
    [p99] = await asyncio.to_thread(
        prometheus.query,
        'histogram_quantile(0.99, sum by (le) (grpc_server_handling_seconds_bucket{grpc_type="unary"}))',
    )
    assert 0 < float(p99["value"][1]) <= GO_DEFAULT_BUCKETS[-1]


def test_a_client_pointed_at_the_metrics_port_is_told_so(server_process):
    metrics = server_process.addresses["metrics"]
    result = run_client("hello", "--name", "Ada", "--target", metrics, "--timeout", "1")
    assert result.returncode == 1
    assert result.stderr.endswith(
        f"; {metrics} serves /metrics: is this the metrics port? "
        "Use the server's `listening on` address\n"
    ), result.stderr
    assert result.stderr.count("\n") == 1


def test_a_scrape_left_unanswered_at_shutdown_is_no_error(server_process):
    """A scraper that connected and sent nothing yet when the server stops: its connection
    is closed, and the log stays clean (no "Exception in callback" ERROR)."""
    host, port = server_process.addresses["metrics"].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as scraper:
        scraper.sendall(b"GET /metrics HTTP/1.1\r\n")  # the rest of its head never comes
        assert server_process.stop() == 0
        assert scraper.recv(1) == b""  # closed
    assert " ERROR " not in server_process.output, server_process.output
    assert "Traceback" not in server_process.output
