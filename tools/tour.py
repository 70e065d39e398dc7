"""The tour: run every step's server and client demo in order and show what each adds.

    python tools/tour.py [NN]      (make tour [STEP=NN])

For each step: a banner with its title and what it adds, its servers started with
`--port 0` (from step 10 on the Logger first, then the Greeter pointed at it), each client
demo run against the Greeter with its output shown, the servers stopped (SIGTERM, exit code 0
expected) and their logs shown. Exit code 1 if any demo or server
misbehaves.
"""

import argparse
import contextlib
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools import dashboards
from tools.broker import KafkaBroker, S3Server
from tools.envoy import RELEASES, EnvoyProcess
from tools.otlp_receiver import OtlpReceiver
from tools.processes import StepServices, demo_environment, free_port, run_script, run_tool
from tools.prometheus import INSTALL_HINT, PrometheusProcess
from tools.redis import RedisServer
from tools.steps import ROOT, Step, select_steps

# The /metrics port each service has in deploy/prometheus.yml (the tour's servers use others).
METRICS_PORTS = {"greeter": 9464, "logger": 9465}


@dataclass(frozen=True)
class Demo:
    # The program's arguments; "{target}" becomes the Greeter's address, "{logger}" the
    # Logger's (steps 10 on), "{replica:NAME}" one replica's (greeter-2), "{envoy}" Envoy's, "{certs}" the directory of the certificates made for the tour
    # (steps 06 on), and "$LOGGER_AUTH_TOKEN" and "$GREETER_AUTH_TOKEN" those tokens (shown
    # as written, run with them).
    args: tuple[str, ...]
    fails: bool = False  # a demo of an error: it must exit non-zero
    # "client.py"; "grpcurl" (the binary installed in the virtual env); "curl" (the system's,
    # to Envoy's REST API, step 19 on); "metrics" (the lines
    # of the server's /metrics that start with args[0] and are not 0); "promql" (a real
    # Prometheus, started with the step's deploy/ files, answers the query args[0]); "trace"
    # (the tree of the last client's trace, from the tour's OTLP receiver); "stop" (stops
    # the service args[0], as `kill -TERM` would); "restart" (starts it again at its address);
    # "dashboard" (every panel of the step's Grafana dashboard, for the service args[0], as
    # the entry's Prometheus answers it); "manifests" (the step's Kubernetes manifests built
    # and checked offline: tools/manifests.py).
    program: str = "client.py"
    env: tuple[tuple[str, str], ...] = ()  # environment variables set for this demo only
    # A client demo run again and again until the Greeter's log shows this text (30 s at
    # most): for what happens only after some time, such as a circuit breaker closing.
    until_logged: str = ""


@dataclass(frozen=True)
class TourEntry:
    title: str
    adds: str
    demos: tuple[Demo, ...]
    # A line of the tour's output that shows the step's feature working; the tour's test
    # (tests/test_tour.py) looks for it, as grpc-go's examples_test.sh greps its examples.
    shows: str
    traces: bool = False  # servers and clients export spans to an OTLP receiver the tour runs
    # Several replicas of a service (step 12 on), e.g. (("greeter", 3),): "{target}" then
    # names them all (ipv4:HOST:PORT,HOST:PORT,...).
    replicas: tuple[tuple[str, int], ...] = ()
    # A real Envoy (tools/envoy.py) with the step's deploy/envoy.yaml in front of the
    # Greeters, run as compose runs them (tools/envoy.RELEASES, step 17): "{envoy}" is its
    # address.
    envoy: bool = False
    # Settings of the step's servers for the tour, e.g. (("GREETER_LOGGER_BREAKER_RESET", "1"),).
    server_env: tuple[tuple[str, str], ...] = ()
    # A real Prometheus (when installed) scrapes every service from the start, for `dashboard`.
    prometheus: bool = False
    # A real Kafka-protocol broker (tools/broker.py) for the services (KAFKA_BOOTSTRAP_SERVERS).
    broker: bool = False
    # A real Redis (tools/redis.py) where the Greeters share their rate limits (step 18 on).
    redis: bool = False


def demo(
    *args: str,
    fails: bool = False,
    env: dict[str, str] | None = None,
    until_logged: str = "",
    target: str = "{target}",
) -> Demo:
    return Demo(
        args=(*args, "--target", target),
        fails=fails,
        env=tuple((env or {}).items()),
        until_logged=until_logged,
    )


def metrics(prefix: str, service: str = "greeter", until: str = "") -> Demo:
    """The service's /metrics lines that start with `prefix`; with `until`, once a line
    shows that text (what happens in the background, such as an event being counted)."""
    return Demo(args=(prefix, service, until), program="metrics")


def broker(action: str) -> Demo:
    """ "stop" or "start" the tour's Kafka-protocol broker (an entry with broker=True)."""
    return Demo(args=(action,), program="broker")


def redis(action: str) -> Demo:
    """ "stop" or "start" the tour's Redis (an entry with redis=True)."""
    return Demo(args=(action,), program="redis")


def last_trace() -> Demo:
    return Demo(args=(), program="trace")


def stop(service: str) -> Demo:
    return Demo(args=(service,), program="stop")


def restart(service: str) -> Demo:
    return Demo(args=(service,), program="restart")


def dashboard(service: str) -> Demo:
    return Demo(args=(service,), program="dashboard")


def manifests() -> Demo:
    return Demo(args=(), program="manifests")


def probe(service: str = "greeter") -> Demo:
    """The plaintext probe port's health check (step 20 on), as the kubelet asks it."""
    return Demo(
        args=("-plaintext", f"{{probes:{service}}}", "grpc.health.v1.Health/Check"),
        program="grpcurl",
    )


def promql(query: str) -> Demo:
    return Demo(args=(query,), program="promql")


def curl(path: str, data: str, *, token: bool = True, fails: bool = False) -> Demo:
    """`curl` POSTing `data` as JSON to Envoy's REST API (step 19 on), trusting the tour's
    CA, with the Greeter's token unless `token` is False; an HTTP error exits non-zero and
    shows the body."""
    headers = ("-H", "authorization: Bearer $GREETER_AUTH_TOKEN") if token else ()
    flags = ("-s", "--fail-with-body", "-w", "\\n", "--cacert", "{certs}/ca.crt")
    return Demo(
        args=(*flags, *headers, "-H", "x-user-id: ada", "--json", data, "https://{envoy}" + path),
        program="curl",
        fails=fails,
    )


def grpcurl(
    *args: str,
    data: str | None = None,
    server: str = "{target}",
    headers: tuple[str, ...] = (),
    fails: bool = False,
) -> Demo:
    """`grpcurl [-H header ...] [-d data] SERVER args...`, trusting the tour's CA."""
    flags = ("-cacert", "{certs}/ca.crt", *(("-d", data) if data else ()))
    for header in headers:
        flags += ("-H", header)
    return Demo(args=(*flags, server, *args), program="grpcurl", fails=fails)


TOUR: dict[int, TourEntry] = {
    1: TourEntry(
        title="Basic unary RPC",
        adds="one request, one reply: SayHello, with input validation and graceful shutdown",
        shows="Hello, Ada!",
        demos=(demo("hello", "--name", "Ada"), demo("hello", "--name", "", fails=True)),
    ),
    2: TourEntry(
        title="Server streaming",
        adds="one request, many replies over time: StreamGreetings, bounded and cancellable",
        shows="Hello, Ada! (3/3)",
        demos=(
            demo("stream", "--name", "Ada", "--count", "3"),
            demo("stream", "--name", "Ada", "--count", "11", fails=True),
        ),
    ),
    3: TourEntry(
        title="Bidirectional chat",
        adds="the client streams: GreetMany answers once for many names, Chat answers each "
        "message as it arrives; both bounded and leak-free",
        shows="Hello, Ada, Grace and Alan!",
        demos=(
            demo("many", "--name", "Ada", "--name", "Grace", "--name", "Alan"),
            demo("chat", "--message", "Ada", "--message", "Grace"),
            demo("chat", "--message", "Ada", "--message", "", "--message", "Grace", fails=True),
        ),
    ),
    4: TourEntry(
        title="Interceptors",
        adds="one log line per RPC (method, peer, status, duration) on the server and the client",
        shows="INFO greeter.rpc: /greeter.v1.Greeter/SayHello code=INVALID_ARGUMENT peer=ipv4:127.0.0.1:",
        demos=(
            demo("hello", "--name", "Ada", "-v"),
            demo("stream", "--name", "Ada", "--count", "2", "-v"),
            demo("hello", "--name", "", "-v", fails=True),
        ),
    ),
    5: TourEntry(
        title="Metadata auth",
        adds="a bearer token and x-user-id on every call, checked by a server interceptor",
        shows="error: UNAUTHENTICATED: invalid token",
        demos=(
            demo("hello", "--name", "Ada", "--user-id", "ada"),
            demo("chat", "--message", "Ada", "--message", "Grace", "--user-id", "ada"),
            demo(
                "hello",
                "--name",
                "Ada",
                fails=True,
                env={"GREETER_AUTH_TOKEN": "not-the-right-token"},
            ),
        ),
    ),
    6: TourEntry(
        title="TLS and mutual TLS",
        adds="TLS only: the client verifies the server against its CA (certificates from gen_certs.sh)",
        shows="CERTIFICATE_VERIFY_FAILED",
        demos=(
            demo("hello", "--name", "Ada", "--user-id", "ada"),
            demo("stream", "--name", "Ada", "--count", "2", "--user-id", "ada"),
            demo("hello", "--name", "Ada", "--ca", "{certs}/client.crt", fails=True),
        ),
    ),
    7: TourEntry(
        title="Reflection and health",
        adds="grpcurl lists and describes the API; health checks for probes; NOT_SERVING before shutdown",
        shows='"status": "SERVING"',
        demos=(
            grpcurl("list"),
            grpcurl("describe", "greeter.v1.Greeter"),
            grpcurl("grpc.health.v1.Health/Check", data='{"service": "greeter.v1.Greeter"}'),
            demo("hello", "--name", "Ada", "--user-id", "ada"),
        ),
    ),
    8: TourEntry(
        title="Prometheus metrics",
        adds="go-grpc-prometheus metrics for every RPC on /metrics, alert rules, a real Prometheus",
        shows='grpc_server_handled_total{grpc_code="InvalidArgument",grpc_method="SayHello",grpc_service="greeter.v1.Greeter",grpc_type="unary"} 1.0',
        demos=(
            demo("hello", "--name", "Ada", "--user-id", "ada"),
            demo("hello", "--name", "Grace", "--user-id", "ada"),
            demo("hello", "--name", "", "--user-id", "ada", fails=True),
            demo("stream", "--name", "Ada", "--count", "2", "--user-id", "ada"),
            metrics("grpc_server_handled_total"),
            promql("sum by (grpc_method, grpc_code) (grpc_server_handled_total) > 0"),
        ),
    ),
    9: TourEntry(
        title="OpenTelemetry tracing",
        adds="one trace per call from the client through the server, exported over OTLP",
        shows="greeter: SERVER greeter.v1.Greeter/StreamGreetings",
        traces=True,
        demos=(
            demo("hello", "--name", "", "--user-id", "ada", fails=True),
            last_trace(),
            demo("stream", "--name", "Ada", "--count", "2", "--user-id", "ada"),
            last_trace(),
        ),
    ),
    10: TourEntry(
        title="A second service",
        adds="the Greeter reports every greeting to a Logger service over gRPC; a Logger that is down costs a warning, not a greeting",
        shows="logger: SERVER logger.v1.Logger/Record",
        traces=True,
        demos=(
            demo("hello", "--name", "Ada", "--user-id", "ada"),
            demo("chat", "--message", "Ada", "--message", "Grace", "--user-id", "ada"),
            last_trace(),
            grpcurl(
                "logger.v1.Logger/ListRecent",
                server="{logger}",
                headers=("authorization: Bearer $LOGGER_AUTH_TOKEN", "x-user-id: ada"),
            ),
            stop("logger"),
            demo("hello", "--name", "Ada", "--user-id", "ada"),
            metrics("greeter_unlogged_greetings_total"),
        ),
    ),
    11: TourEntry(
        title="Metadata propagation",
        adds="the caller's user id and a request id cross the hop to the Logger in metadata; one request id in every log line, entry and span",
        shows=" client=- user=ada request_id=",
        traces=True,
        demos=(
            demo("hello", "--name", "Ada", "--user-id", "ada", "-v"),
            demo("chat", "--message", "Ada", "--message", "Grace", "--user-id", "ada", "-v"),
            grpcurl(
                "logger.v1.Logger/ListRecent",
                data='{"limit": 1}',
                server="{logger}",
                headers=("authorization: Bearer $LOGGER_AUTH_TOKEN", "x-user-id: ada"),
            ),
        ),
    ),
    12: TourEntry(
        title="Load balancing",
        adds="round robin over three Greeter replicas and two Logger replicas, with client-side health checks; a replica that stops loses its share, not calls",
        shows="30 calls over 2 replicas",
        replicas=(("greeter", 3), ("logger", 2)),
        demos=(
            demo("spread", "--name", "Ada", "--calls", "30", "--user-id", "ada"),
            stop("greeter-2"),
            demo("spread", "--name", "Ada", "--calls", "30", "--user-id", "ada"),
        ),
    ),
    13: TourEntry(
        title="Retry and timeout",
        adds="gRPC retries UNAVAILABLE for the methods safe to repeat; the caller's deadline reaches the Logger, minus a margin; a retried entry is stored once",
        shows="SayHello greeting not logged (request_id=",
        demos=(
            demo("hello", "--name", "Ada", "--user-id", "ada", "-v"),
            stop("logger"),
            demo("hello", "--name", "Ada", "--user-id", "ada", "--timeout", "0.3", "-v"),
        ),
    ),
    14: TourEntry(
        title="Circuit breaker",
        adds="after 5 failed Logger calls in a row the Greeter stops calling it: greetings get their speed back; one trial call later closes the breaker",
        shows="Logger breaker closed: the trial call succeeded",
        server_env=(("GREETER_LOGGER_BREAKER_RESET", "1"),),  # 5 s by default
        demos=(
            stop("logger"),
            # -v: each call's duration. The first 5 wait for a Logger that is down; then the
            # breaker is open and the Greeter answers at once.
            demo("spread", "--name", "Ada", "--calls", "8", "--user-id", "ada", "-v"),
            metrics("greeter_logger_breaker"),
            restart("logger"),
            demo(
                "hello", "--name", "Ada", "--user-id", "ada", until_logged="Logger breaker closed"
            ),
            metrics("greeter_logger_breaker"),
        ),
    ),
    15: TourEntry(
        title="Grafana dashboards",
        adds="a dashboard built as code (grafana-foundation-sdk), each panel's query checked against a real Prometheus; exemplars link latency to traces",
        shows="skipped: breaker open",
        prometheus=True,
        demos=(
            demo("spread", "--name", "Ada", "--calls", "10", "--user-id", "ada"),
            demo("hello", "--name", "", "--user-id", "ada", fails=True),
            demo("stream", "--name", "Ada", "--count", "3", "--user-id", "ada"),
            demo("chat", "--message", "Ada", "--message", "Grace", "--user-id", "ada"),
            stop("logger"),
            demo("spread", "--name", "Ada", "--calls", "7", "--user-id", "ada"),
            dashboard("greeter.v1.Greeter"),
        ),
    ),
    16: TourEntry(
        title="Async events over Kafka",
        adds="each greeting publishes a GreetedEvent through a bounded outbox; the Logger counts them from the topic, once each; a broker that is down costs no greeting and no event",
        shows="logger_events_processed_total 6.0",
        broker=True,
        demos=(
            demo("spread", "--name", "Ada", "--calls", "3", "--user-id", "ada"),
            metrics("logger_events", service="logger", until="processed_total 3.0"),
            broker("stop"),
            demo("spread", "--name", "Ada", "--calls", "3", "--user-id", "ada", "-v"),
            metrics("greeter_events", until="greeter_events_outbox 3.0"),
            broker("start"),
            metrics("logger_events", service="logger", until="processed_total 6.0"),
            metrics("greeter_events"),
        ),
    ),
    17: TourEntry(
        title="Versioned API and a canary through Envoy",
        adds="greeter.v2 beside an unchanged v1 (buf lint and buf breaking check it); Envoy sends 10% of v1 calls and every v2 call to the canary release, x-canary: always sends a caller there",
        shows="Hello, Ada Lovelace!",
        broker=True,
        replicas=(("greeter", 3),),
        # Envoy's health checks and 100 calls would fill the logs below: failures only.
        server_env=(("GREETER_LOG_LEVEL", "WARNING"), ("LOGGER_LOG_LEVEL", "WARNING")),
        envoy=True,
        demos=(
            demo("spread", "--name", "Ada", "--calls", "100", "--user-id", "ada", target="{envoy}"),
            demo(
                "hello",
                "--api",
                "v2",
                "--name",
                "Ada",
                "--family-name",
                "Lovelace",
                "--user-id",
                "ada",
                target="{envoy}",
            ),
            demo(
                "spread",
                "--name",
                "Ada",
                "--calls",
                "1",
                "--canary",
                "--user-id",
                "ada",
                target="{envoy}",
            ),
            # Straight to a replica of the previous release: it does not serve v2.
            demo(
                "hello",
                "--api",
                "v2",
                "--name",
                "Ada",
                "--user-id",
                "ada",
                fails=True,
                target="{replica:greeter}",
            ),
        ),
    ),
    18: TourEntry(
        title="Rate limits per user and per service",
        adds="a token bucket per user (throttled-py's GCRA) shared by every replica through Redis; over it, RESOURCE_EXHAUSTED with RetryInfo and QuotaFailure; the Logger limits each calling service; Envoy limits each user at the edge",
        shows="as RetryInfo said",
        broker=True,
        redis=True,
        replicas=(("greeter", 3),),
        envoy=True,  # as in step 17 (make up starts it too): the edge's own limit per user
        # Small enough to reach by hand: 2 calls a second, 5 at once, per user.
        server_env=(("GREETER_RATE_LIMIT", "2"), ("GREETER_RATE_BURST", "5")),
        demos=(
            # Three replicas, one bucket: alone, each would let 5 through at once.
            demo("spread", "--name", "Ada", "--calls", "12", "--user-id", "ada"),
            demo("hello", "--name", "Grace", "--user-id", "grace"),  # her own bucket
            metrics("ratelimit_"),
            redis("stop"),
            # To the first replica, whose metrics follow: a new channel may send all three
            # to any one replica.
            demo(
                "spread",
                "--name",
                "Alan",
                "--calls",
                "3",
                "--user-id",
                "alan",
                target="{replica:greeter}",
            ),
            metrics("ratelimit_decisions", until='store="memory"'),
            redis("start"),
        ),
    ),
    19: TourEntry(
        title="REST and JSON beside gRPC, through Envoy",
        adds="google.api.http options map SayHello, StreamGreetings and GreetMany to POST /v1/greetings and /v2/greetings; Envoy's JSON transcoder serves them on the same listener as gRPC, with the same auth, limits and canary split; errors come back as HTTP statuses with a JSON google.rpc.Status",
        shows='{"message":"Hello, Ada Lovelace!"}',
        broker=True,
        replicas=(("greeter", 3),),
        envoy=True,
        server_env=(("GREETER_LOG_LEVEL", "WARNING"), ("LOGGER_LOG_LEVEL", "WARNING")),
        demos=(
            curl("/v2/greetings", '{"person": {"givenName": "Ada", "familyName": "Lovelace"}}'),
            curl("/v1/greetings:stream", '{"name": "Ada", "count": 3}'),
            curl("/v1/greetings:batch", '[{"name": "Ada"}, {"name": "Grace"}]'),
            curl("/v1/greetings", '{"name": ""}', fails=True),
            curl("/v1/greetings", '{"name": "Ada"}', token=False, fails=True),
            # The same Envoy, the same Greeters, in gRPC.
            demo("hello", "--name", "Ada", "--user-id", "ada", target="{envoy}"),
        ),
    ),
    20: TourEntry(
        title="From a commit to a running, scalable deployment: CI/CD and Kubernetes",
        adds="Kubernetes manifests (kustomize overlays) checked offline by kubectl, kubernetes-validate and checkov; a plaintext probe port serving health alone; a maximum connection age so clients find new replicas; a two-stage image and a CI/CD workflow",
        shows="step-20_cicd_kubernetes: dev, prod: built, valid (kubernetes-validate), policies pass (checkov)",
        broker=True,
        server_env=(("GREETER_HEALTH_PORT", "0"),),
        demos=(
            demo("hello", "--name", "Ada", "--user-id", "ada"),
            probe(),  # what Kubernetes' gRPC probe asks: plaintext, no token
            manifests(),
        ),
    ),
    21: TourEntry(
        title="Request validation declared in the protos",
        adds="buf.validate rules on every request field (predefined rules for names, CEL across fields), checked by one interceptor with protovalidate before any handler; INVALID_ARGUMENT with a google.rpc.BadRequest listing each field",
        shows="  count: must be between 1 and 10 (got 11); 0 or unset means 5",
        broker=True,
        demos=(
            demo("hello", "--name", "Ada", "--user-id", "ada"),
            demo("stream", "--name", "", "--count", "11", "--user-id", "ada", fails=True),
            grpcurl(
                "greeter.v1.Greeter/SayHello",
                data='{"name": "Ada\\nLovelace"}',
                headers=("authorization: Bearer $GREETER_AUTH_TOKEN", "x-user-id: ada"),
                fails=True,
            ),
        ),
    ),
}

BAR = "━" * 72


def indent(text: str) -> str:
    return "".join(f"    {line}\n" for line in text.splitlines())


def fill(text: str, places: dict[str, str]) -> str:
    for placeholder, value in places.items():
        text = text.replace(placeholder, value)
    return text


def show_metrics(address: str, prefix: str, until: str = "") -> subprocess.CompletedProcess:
    """The lines of /metrics that start with `prefix` and count something; with `until`,
    asked again until one of them shows it (15 s at most)."""
    print(f"$ curl -s http://{address}/metrics | grep '^{prefix}' | grep -v ' 0.0$'", flush=True)
    deadline = time.monotonic() + 15
    while True:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
            lines = response.read().decode().splitlines()
        shown = [line for line in lines if line.startswith(prefix) and not line.endswith(" 0.0")]
        if not until or any(until in line for line in shown) or time.monotonic() > deadline:
            break
        time.sleep(0.1)  # polling: the service counts in the background
    ok = bool(shown) and (not until or any(until in line for line in shown))
    return subprocess.CompletedProcess(prefix, 0 if ok else 1, "\n".join(shown) + "\n", "")


def ask_prometheus(step: Step, metrics_address: str, query: str) -> subprocess.CompletedProcess:
    """Start a real Prometheus with the step's deploy/ files, scraping the server, and show
    its answer to `query` once it has one. Without the binary, say how to get it."""
    print(f"$ prometheus --config.file=deploy/prometheus.yml   # then ask: {query}", flush=True)
    if shutil.which("prometheus") is None:
        return subprocess.CompletedProcess(
            query, 0, f"(skipped: needs `prometheus`: {INSTALL_HINT})\n", ""
        )
    with PrometheusProcess(step.path / "deploy", {"greeter:9464": metrics_address}) as prometheus:
        deadline = time.monotonic() + 30
        while not (answer := prometheus.query(query)) and time.monotonic() < deadline:
            time.sleep(0.2)  # polling: the first scrape is queryable ~5.5 s after start
    lines = [
        f"{{{', '.join(f'{k}={v!r}' for k, v in r['metric'].items())}}} {r['value'][1]}"
        for r in answer
    ]
    return subprocess.CompletedProcess(query, 0 if lines else 1, "\n".join(lines) + "\n", "")


def show_last_trace(receiver: OtlpReceiver | None, services: int) -> subprocess.CompletedProcess:
    """The tree of the newest client span's trace, once it holds a SERVER span from each of
    the step's `services` (so a trace demo follows a call that reaches all of them)."""
    print("$ # the last trace, as the OTLP receiver got it", flush=True)
    assert receiver is not None, "a trace demo needs an entry with traces=True"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        clients = [s for s in receiver.spans if s.kind == "CLIENT"]
        servers = [
            s
            for s in receiver.spans
            if clients and s.kind == "SERVER" and s.trace_id == clients[-1].trace_id
        ]
        if len(servers) >= services:
            return subprocess.CompletedProcess(
                "trace", 0, receiver.tree(clients[-1].trace_id) + "\n", ""
            )
        time.sleep(0.05)  # polling: the server exports its spans in batches
    return subprocess.CompletedProcess("trace", 1, "", "no complete trace arrived in 15 s\n")


def start_prometheus(step: Step, services: StepServices) -> PrometheusProcess | None:
    """A real Prometheus with the step's deploy/ files, scraping every service the tour
    started, once it has a first scrape of each; None without the binary."""
    print("$ prometheus --config.file=deploy/prometheus.yml   # scraping every service")
    if shutil.which("prometheus") is None:
        print(indent(f"(skipped: needs `prometheus`: {INSTALL_HINT})"), end="")
        return None
    targets = {
        f"{name}:{METRICS_PORTS[name.split('-')[0]]}": process.addresses["metrics"]
        for name, process in services.processes.items()
    }
    prometheus = PrometheusProcess(step.path / "deploy", targets)
    started = time.time()
    deadline = time.monotonic() + 30
    while not prometheus.scraped_after(started):
        if time.monotonic() > deadline:
            prometheus.stop()
            raise RuntimeError("Prometheus did not scrape every service within 30 s")
        time.sleep(0.2)  # polling: the first scrape is queryable ~5.5 s after start
    print(indent(f"scraping {', '.join(targets)} every second"), end="", flush=True)
    return prometheus


def show_dashboard(
    step: Step, prometheus: PrometheusProcess | None, services: StepServices, service: str
) -> subprocess.CompletedProcess:
    """Each panel's current values, once Prometheus has scraped what the demos did."""
    print(f"$ # deploy/grafana/dashboards/greeter.json, each panel now, for service={service}")
    if prometheus is None:
        return subprocess.CompletedProcess(service, 0, "(skipped: no Prometheus)\n", "")
    running = [
        p.addresses["metrics"] for p in services.processes.values() if p.process.poll() is None
    ]
    now, deadline = time.time(), time.monotonic() + 15
    while not prometheus.scraped_after(now, running):
        if time.monotonic() > deadline:
            return subprocess.CompletedProcess(service, 1, "", "no scrape within 15 s\n")
        time.sleep(0.2)  # polling the next scrape
    board = dashboards.load(step.path / "deploy" / "grafana" / "dashboards" / "greeter.json")
    answers = dashboards.evaluate(prometheus, board, {"service": service})
    return subprocess.CompletedProcess(service, 0, dashboards.table(answers) + "\n", "")


def start_envoy(step: Step, services: StepServices, certs: Path) -> EnvoyProcess:
    """Envoy with the step's deploy/envoy.yaml, its upstreams compose's names for the
    tour's Greeters (greeter, greeter-2, greeter-3)."""
    upstreams = {name: services[name].address for name in RELEASES}
    pairs = " ".join(f"{name}={address}" for name, address in upstreams.items())
    print(f"$ python ../tools/envoy.py {pairs} --port 0   # deploy/envoy.yaml", flush=True)
    envoy = EnvoyProcess(step.path, certs, upstreams)
    print(indent(f"envoy on {envoy.address}, admin on {envoy.admin_url}"), end="", flush=True)
    return envoy


def shell_words(args: list[str]) -> str:
    """`args` as a shell command line to paste: a word that names a variable in double
    quotes, so that the shell expands it ("authorization: Bearer $LOGGER_AUTH_TOKEN")."""
    return " ".join(f'"{a}"' if "$" in a and '"' not in a else shlex.quote(a) for a in args)


def run_until_logged(step: Step, args: list[str], env: dict, greeter, d: Demo):
    """The client demo, again every 0.2 s while it succeeds, until the Greeter's log shows
    `d.until_logged`; the runs, and the line that ended them."""
    print(f"    (again every 0.2 s until the greeter logs {d.until_logged!r})", flush=True)
    started, runs = time.monotonic(), 0
    while time.monotonic() < started + 30:
        result = run_script(step.path, "client.py", *args, timeout=60, env=env)
        runs += 1
        seen = [line for line in greeter.output.splitlines() if d.until_logged in line]
        if result.returncode != 0 or seen:
            took = time.monotonic() - started
            shown = f"{runs} runs in {took:.1f} s, the last one said: {result.stdout}"
            return subprocess.CompletedProcess(
                args, result.returncode, shown + "".join(f"{line}\n" for line in seen), ""
            )
        time.sleep(0.2)  # the pace of the demo, not synchronisation
    return subprocess.CompletedProcess(args, 1, "", f"no {d.until_logged!r} in 30 s\n")


def run_entry(step: Step, entry: TourEntry) -> bool:
    print(f"\n{BAR}\nStep {step.label} · {entry.title}\n  adds: {entry.adds}\n{BAR}", flush=True)
    ok = True
    services: StepServices | None = None
    workdir = tempfile.TemporaryDirectory(prefix=f"tour-{step.label}-")
    receiver = OtlpReceiver() if entry.traces else None
    prometheus: PrometheusProcess | None = None
    kafka: KafkaBroker | None = None
    shared_limits: RedisServer | None = None
    envoy: EnvoyProcess | None = None
    stack = contextlib.ExitStack()  # the broker, stopped after the services
    try:
        env = demo_environment(step.path, Path(workdir.name))  # tokens, certificates
        if receiver is not None:  # spans to the tour's receiver, in batches 0.1 s apart
            env |= {
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                "OTEL_BSP_SCHEDULE_DELAY": "100",
            }
        if entry.broker:
            s3 = stack.enter_context(S3Server())
            kafka = stack.enter_context(KafkaBroker(s3))
            print(
                f"$ python tools/broker.py --port {kafka.port}   # Tansu, a Kafka-protocol broker"
            )
            env |= {"KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap, "LOGGER_EVENTS_ASSIGNMENT": "all"}
        if entry.redis:
            shared_limits = stack.enter_context(RedisServer())
            print(
                f"$ python tools/redis.py --port {shared_limits.port}   # where limits are shared"
            )
            env["GREETER_RATE_LIMIT_REDIS"] = shared_limits.url
        services = StepServices(
            step.path,
            env | dict(entry.server_env),
            replicas=dict(entry.replicas),
            replica_env=RELEASES if entry.envoy else None,
            # A service the tour restarts comes back at its address: a port below the
            # kernel's ephemeral range, which no outgoing connection can take meanwhile.
            ports={d.args[0]: free_port() for d in entry.demos if d.program == "restart"},
        )
        for name, server in services.processes.items():
            wiring = "".join(f"{k}={v} " for k, v in services.wiring[name].items())
            print(f"$ {wiring}python {server.command[1]} --port 0")
            for line, address in server.addresses.items():
                print(f"    {line} on {address}", flush=True)
        if entry.prometheus:
            prometheus = start_prometheus(step, services)
        greeter = services["greeter"]
        places = {
            "{target}": services.targets["greeter"],
            "{certs}": str(Path(workdir.name) / "certs"),
        }
        if "logger" in services.targets:
            places["{logger}"] = services.targets["logger"]
        for name, process in services.processes.items():  # one replica: "{replica:greeter-2}"
            places[f"{{replica:{name}}}"] = process.address
            if "probes" in process.addresses:  # its probe port (step 20 on): "{probes:greeter}"
                places[f"{{probes:{name}}}"] = process.addresses["probes"]
        if entry.envoy:
            envoy = start_envoy(step, services, Path(workdir.name) / "certs")
            places["{envoy}"] = envoy.address
        # As a learner types them in the step folder: certs/, not the tour's own folder.
        shown_places = {**places, "{certs}": "certs"}
        for d in entry.demos:
            args = [fill(a, places) for a in d.args]
            shown = shell_words([fill(a, shown_places) for a in d.args])
            if d.fails:
                shown += "   # an error, on purpose"
            if d.program in ("grpcurl", "curl"):
                print(f"$ {d.program} {shown}", flush=True)
                binary = (
                    str(Path(sys.executable).with_name("grpcurl"))
                    if d.program == "grpcurl"
                    else shutil.which("curl") or "curl"
                )
                secrets = {
                    "$LOGGER_AUTH_TOKEN": env.get("LOGGER_AUTH_TOKEN", ""),
                    "$GREETER_AUTH_TOKEN": env.get("GREETER_AUTH_TOKEN", ""),
                }
                result = subprocess.run(
                    [binary, *(fill(a, secrets) for a in args)],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
            elif d.program == "stop":
                print(f"$ kill -TERM <{args[0]}>   # the {args[0]} stops", flush=True)
                code = services[args[0]].stop()
                result = subprocess.CompletedProcess(args, code, f"exit code {code}\n", "")
            elif d.program == "restart":
                again = services.restart(args[0])
                print(f"$ python {again.command[1]} --port {again.address.rsplit(':', 1)[1]}")
                result = subprocess.CompletedProcess(args, 0, f"listening on {again.address}\n", "")
            elif d.program == "metrics":
                prefix, service, until = args
                result = show_metrics(services[service].addresses["metrics"], prefix, until)
            elif d.program in ("broker", "redis"):
                print(f"$ # the {d.program} {args[0]}s", flush=True)
                getattr(kafka if d.program == "broker" else shared_limits, args[0])()
                result = subprocess.CompletedProcess(args, 0, "", "")
            elif d.program == "manifests":
                print(f"$ python ../tools/manifests.py {step.label}", flush=True)
                result = subprocess.run(
                    [sys.executable, str(ROOT / "tools" / "manifests.py"), step.label],
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
            elif d.program == "promql":
                result = ask_prometheus(step, greeter.addresses["metrics"], args[0])
            elif d.program == "dashboard":
                result = show_dashboard(step, prometheus, services, args[0])
            elif d.program == "trace":
                result = show_last_trace(receiver, len(services.processes))
            else:
                shown_env = "".join(f"{name}={shlex.quote(value)} " for name, value in d.env)
                print(f"$ {shown_env}python client.py {shown}", flush=True)
                if d.until_logged:
                    result = run_until_logged(step, args, {**env, **dict(d.env)}, greeter, d)
                else:
                    result = run_script(
                        step.path, "client.py", *args, timeout=60, env={**env, **dict(d.env)}
                    )
            print(indent(result.stdout + result.stderr), end="")
            if (result.returncode != 0) != d.fails:
                expected = "an error" if d.fails else "success"
                print(f"  ✗ expected {expected}, got exit code {result.returncode}")
                ok = False
    except (RuntimeError, subprocess.SubprocessError) as err:  # includes a set-up or demo timeout
        print(f"  ✗ {err}")
        ok = False
    finally:
        # Nested, so that what the tour started is stopped even when printing fails (its
        # output piped into `head`, which has exited: BrokenPipeError).
        try:
            if prometheus is not None:
                prometheus.stop()
            if envoy is not None:  # callers first
                envoy.stop()
            if services is not None:
                for name, code in services.stop().items():
                    print(f"  {name} log:")
                    print(indent(services[name].output), end="")
                    if code != 0:
                        print(f"  ✗ {name} exited with {code}, expected 0")
                        ok = False
        finally:
            if services is not None:
                services.stop()  # (a second stop does nothing)
            stack.close()
            workdir.cleanup()
            if receiver is not None:
                receiver.stop()
    print(f"{'✓' if ok else '✗'} step {step.label}", flush=True)
    return ok


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Run every step's demo, or the steps named.")
    parser.add_argument("steps", nargs="*", metavar="NN")
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    steps = select_steps(args.steps, args.root)
    started = time.monotonic()
    failed = []
    for step in steps:
        entry = TOUR.get(step.number)
        if entry is None:
            print(f"✗ step {step.label}: no tour entry in tools/tour.py")
            failed.append(step.label)
        elif not run_entry(step, entry):
            failed.append(step.label)
    seconds = time.monotonic() - started
    if failed:
        print(f"\ntour FAILED at step(s) {', '.join(failed)} ({seconds:.1f}s)")
        return 1
    print(f"\ntour done: {len(steps)} step(s) in {seconds:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main, sys.argv[1:], stopped=130))
