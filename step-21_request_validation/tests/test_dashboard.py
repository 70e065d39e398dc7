"""The Grafana dashboard (dashboard.py) against real data: a real Prometheus, with this
folder's deploy/ files, scrapes a real Greeter and a real Logger process after calls with
known outcomes (OK calls, refused names, a stream, a chat, then a Logger that hangs until the
breaker opens). Every panel's PromQL, variables filled in, returns data, and the values are
what the calls did; exemplars carry the trace ids of real traces; Prometheus loads the alert
rules."""

import asyncio
import math
import re
import signal
import time
from dataclasses import dataclass

import grpc
import pytest

import dashboard
from greeter.v1 import greeter_pb2_grpc
from helpers import STEP_DIR, Request, messages, open_channel, rpc_error, say
from tests.support.helpers import eventually, require_binary
from tools import dashboards
from tools.processes import StepServices, run_script
from tools.prometheus import INSTALL_HINT, PrometheusProcess

DEPLOY = STEP_DIR / "deploy"
GRAFANA = DEPLOY / "grafana"
GREETER, LOGGER = "greeter.v1.Greeter", "logger.v1.Logger"
# What the calls below do, and so what the panels must show.
OK_GREETINGS, REFUSED_NAMES, STREAMED, CHATTED = 6, 2, 3, 2
GREETED_AT_ONCE = ("Ada", "Grace", "Alan", "Edsger")  # by one GreetMany call
REPORTED = OK_GREETINGS + 3  # the stream's, the GreetMany call's, the chat's; not a refused name
HUNG_GREETINGS = 3  # while the Logger hangs: 2 failed reports open the breaker, 1 is skipped
# Each user may make 20 calls at once (then one a second): ada's calls above take 15 of her
# tokens; mallory calls until THROTTLED of hers are refused.
RATE_BURST, THROTTLED = 20, 3
BREAKER_FAILURES = 2


@dataclass
class Observed:
    """What Prometheus answered once it had scraped every call."""

    greeter: dict  # panel title -> {series name: value}, with $service the Greeter
    logger: dict  # the same, with $service the Logger
    greeter_instance: str  # the instance label of the Greeter's metrics
    mallory_greeted: int  # her calls that passed before THROTTLED were refused
    exemplar_trace_ids: set[str]
    trace_ids: set[str]  # those of them whose spans the OTLP receiver got
    rules: dict[str, str]  # alert name -> health


def by_panel(answers: dict) -> dict[str, dict[str, float]]:
    panels: dict[str, dict[str, float]] = {}
    for target, series in answers.items():
        values = panels.setdefault(target.panel, {})
        values.update({s.name: s.value for s in series})
        values.setdefault(f"{target.ref_id} answered", len(series))
    return panels


async def make_known_calls(address: str, logger) -> int:
    """The calls whose outcomes the panels show; how many of mallory's passed."""
    mallory_greeted = await flood_as_mallory(address)
    async with open_channel(address) as channel:
        stub = greeter_pb2_grpc.GreeterStub(channel)
        for _ in range(OK_GREETINGS):
            await stub.SayHello(Request(name="Ada"), timeout=5)
        for _ in range(REFUSED_NAMES):
            await rpc_error(stub.SayHello(Request(name=""), timeout=5))
        assert len(await messages(stub.StreamGreetings(Request(name="Ada", count=STREAMED)))) == 3
        await stub.GreetMany(iter([Request(name=n) for n in GREETED_AT_ONCE]), timeout=5)
        chat = stub.Chat(timeout=5)
        for name in ("Ada", "Grace")[:CHATTED]:
            await say(chat, name)
        await chat.done_writing()
        await chat.read()
        # The Logger hangs (SIGSTOP: its connections stay open, nothing answers): reports end
        # with DEADLINE_EXCEEDED until the breaker opens. Then it carries on (SIGCONT).
        logger.process.send_signal(signal.SIGSTOP)
        try:
            for _ in range(HUNG_GREETINGS):
                await stub.SayHello(Request(name="Ada"), timeout=5)
        finally:
            logger.process.send_signal(signal.SIGCONT)
    return mallory_greeted


async def flood_as_mallory(address: str) -> int:
    """SayHello as mallory until THROTTLED calls are refused by her rate limit: her first
    RATE_BURST pass (and one more for each second the calls took)."""
    greeted = refused = 0
    async with open_channel(address, user_id="mallory") as channel:
        stub = greeter_pb2_grpc.GreeterStub(channel)
        while refused < THROTTLED:
            try:
                await stub.SayHello(Request(name="Mallory"), timeout=5)
                greeted += 1
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
                refused += 1
    return greeted


@pytest.fixture(scope="module")
def observed(receiver) -> Observed:
    require_binary("prometheus", INSTALL_HINT)
    env = {
        "GREETER_STREAM_INTERVAL": "0.02",
        "GREETER_LOGGER_BREAKER_FAILURES": str(BREAKER_FAILURES),
        "GREETER_LOGGER_BREAKER_RESET": "600",  # it stays open for the test
        "GREETER_RATE_LIMIT": "1",
        "GREETER_RATE_BURST": str(RATE_BURST),
    }
    with StepServices(STEP_DIR, env=env) as services:
        greeter, logger = services["greeter"], services["logger"]
        metrics = {
            "greeter:9464": greeter.addresses["metrics"],
            "logger:9465": logger.addresses["metrics"],
        }
        with PrometheusProcess(DEPLOY, metrics) as prometheus:
            started = time.time()
            asyncio.run(until(lambda: prometheus.scraped_after(started), "a first scrape"))
            mallory_greeted = asyncio.run(make_known_calls(greeter.address, logger))
            done = time.time()
            asyncio.run(until(lambda: prometheus.scraped_after(done), "a scrape of the calls"))
            board = dashboards.load(GRAFANA / "dashboards" / "greeter.json")
            greeter_panels = by_panel(dashboards.evaluate(prometheus, board, {"service": GREETER}))
            logger_panels = by_panel(dashboards.evaluate(prometheus, board, {"service": LOGGER}))
            asyncio.run(
                until(
                    lambda: all(r["health"] != "unknown" for r in prometheus.rules()),
                    "a first evaluation of the alert rules",
                )
            )
            rules = {r["name"]: r["health"] for r in prometheus.rules()}
            exemplars = f'grpc_server_handling_seconds_bucket{{grpc_service="{GREETER}"}}'
            exemplar_trace_ids: set[str] = set()

            def traced() -> set[str]:
                """The exemplars' trace ids whose spans reached the trace receiver."""
                exemplar_trace_ids.update(
                    e["labels"]["trace_id"]
                    for series in prometheus.exemplars(exemplars, started)
                    for e in series["exemplars"]
                )
                return exemplar_trace_ids & {span.trace_id for span in receiver.spans}

            # Exemplars are queryable a moment after their scrape, and the servers export
            # their spans in batches: poll for both.
            asyncio.run(until(lambda: bool(traced()), "exemplars with exported traces"))
            trace_ids = traced()
    return Observed(
        greeter_panels,
        logger_panels,
        metrics["greeter:9464"],
        mallory_greeted,
        exemplar_trace_ids,
        trace_ids,
        rules,
    )


async def until(condition, message: str) -> None:
    # Prometheus answers about its first scrape ~5.5 s after it starts.
    await eventually(
        lambda: asyncio.to_thread(condition), timeout=30, interval=0.2, message=message
    )


def exactly(value: float, expected: float) -> bool:
    """Rates of series of one process, scraped together, are extrapolated alike: their
    ratios are the ratios of the counts."""
    return math.isclose(value, expected, rel_tol=1e-6)


# --- The JSON --------------------------------------------------------------------------


def test_the_checked_in_json_is_what_dashboard_py_builds():
    assert (GRAFANA / "dashboards" / "greeter.json").read_text() == dashboard.rendered()


def provisioned_uids() -> set[str]:
    text = (GRAFANA / "provisioning" / "datasources" / "datasources.yml").read_text()
    return set(re.findall(r"^\s+uid: (\S+)$", text, re.MULTILINE))


def test_every_target_has_a_unique_ref_id_and_a_provisioned_data_source():
    board = dashboards.load(GRAFANA / "dashboards" / "greeter.json")
    targets = dashboards.targets(board)
    assert len(targets) == 16
    for panel in {t.panel for t in targets}:
        ref_ids = [t.ref_id for t in targets if t.panel == panel]
        assert len(ref_ids) == len(set(ref_ids)), panel
        assert all(ref_ids), panel
    assert {t.datasource_uid for t in targets} <= provisioned_uids()
    assert provisioned_uids() == {"prometheus", "jaeger"}


def test_exemplars_link_to_the_jaeger_data_source():
    text = (GRAFANA / "provisioning" / "datasources" / "datasources.yml").read_text()
    assert re.search(r"- name: trace_id\n\s+datasourceUid: jaeger\n", text)
    board = dashboards.load(GRAFANA / "dashboards" / "greeter.json")
    with_exemplars = {
        p["title"] for p in board["panels"] if any(t.get("exemplar") for t in p.get("targets", []))
    }
    assert with_exemplars == {"Latency p50, p95, p99", "Latency heatmap"}


# --- Every panel against a real Prometheus -----------------------------------------------


def test_every_panel_returns_data_for_the_greeter(observed):
    empty = [
        f"{panel}: {key}"
        for panel, values in observed.greeter.items()
        for key, count in values.items()
        if key.endswith(" answered") and count == 0
    ]
    assert not empty


def test_the_logger_as_the_selected_service(observed):
    """The Logger has no streams and refused nothing: those two panels are empty for it,
    but for the reports the Greeter gave up on while the Logger hung: one that reached it
    just before SIGSTOP ends, when it wakes, cancelled (once in CI, on a loaded machine)."""
    for panel in ("Request rate", "Latency p50, p95, p99", "Latency heatmap", "In-flight calls"):
        assert observed.logger[panel]["A answered"] > 0, panel
    assert observed.logger["Request rate"]["Record"] > 0
    errors = set(observed.logger["Error ratio by code"]) - {"A answered"}
    assert errors <= {"Record Cancelled", "Record DeadlineExceeded"}, errors
    assert observed.logger["Messages per stream"]["A answered"] == 0


def sayhello_calls(observed: Observed) -> int:
    return OK_GREETINGS + REFUSED_NAMES + HUNG_GREETINGS + observed.mallory_greeted + THROTTLED


def test_request_rate_counts_each_method(observed):
    rates = observed.greeter["Request rate"]
    greetings = sayhello_calls(observed)
    assert exactly(rates["SayHello"] / rates["StreamGreetings"], greetings), rates
    assert exactly(rates["Chat"], rates["StreamGreetings"]), rates  # one of each


def test_error_ratio_names_the_code_and_its_share(observed):
    ratios = observed.greeter["Error ratio by code"]
    greetings = sayhello_calls(observed)
    assert set(ratios) == {"A answered", "SayHello InvalidArgument", "SayHello ResourceExhausted"}
    assert exactly(ratios["SayHello InvalidArgument"], REFUSED_NAMES / greetings), ratios
    assert exactly(ratios["SayHello ResourceExhausted"], THROTTLED / greetings), ratios


def test_rate_limited_calls_are_shown_by_method_and_limit(observed):
    assert RATE_BURST <= observed.mallory_greeted
    limited = observed.greeter["Rate-limited calls"]
    rates = observed.greeter["Request rate"]
    assert limited["SayHello per_user"] > 0
    assert exactly(
        limited["SayHello per_user"] / rates["SayHello"], THROTTLED / sayhello_calls(observed)
    )
    assert limited["Chat per_user"] == 0


def test_latency_quantiles_and_heatmap_have_values(observed):
    latency = observed.greeter["Latency p50, p95, p99"]
    for q in ("p50", "p95", "p99"):
        assert 0 < latency[f"SayHello {q}"] <= 10, latency
    assert latency["SayHello p50"] <= latency["SayHello p95"] <= latency["SayHello p99"]
    heatmap = observed.greeter["Latency heatmap"]
    assert heatmap["+Inf"] > 0 and heatmap["+Inf"] >= heatmap["0.005"]


def test_no_call_is_in_flight_once_all_have_finished(observed):
    in_flight = observed.greeter["In-flight calls"]
    assert {k: v for k, v in in_flight.items() if k != "A answered"} == {
        "SayHello": 0,
        "StreamGreetings": 0,
        "GreetMany": 0,
        "Chat": 0,
    }


def test_messages_per_stream_are_what_the_stream_and_the_chat_carried(observed):
    per_stream = observed.greeter["Messages per stream"]
    assert exactly(per_stream["StreamGreetings sent"], STREAMED)
    assert exactly(per_stream["StreamGreetings received"], 1)
    assert exactly(per_stream["GreetMany sent"], 1)
    assert exactly(per_stream["GreetMany received"], len(GREETED_AT_ONCE))
    assert exactly(per_stream["Chat sent"], CHATTED)
    assert exactly(per_stream["Chat received"], CHATTED)


def test_the_logger_dependency_shows_failed_retried_and_skipped_reports(observed):
    failed = observed.greeter["Greetings not logged"]
    assert set(failed) == {
        "A answered",
        "B answered",
        "failed: DeadlineExceeded",
        "skipped: breaker open",
    }
    skipped = HUNG_GREETINGS - BREAKER_FAILURES
    assert exactly(
        failed["failed: DeadlineExceeded"] / failed["skipped: breaker open"], 2 / skipped
    )
    # Each failed report is one or more attempts (tenacity), each a call that timed out.
    calls = observed.greeter["Logger calls by code"]
    retries = observed.greeter["Logger retries"]
    assert set(calls) == {"A answered", "OK", "DeadlineExceeded"}
    reported = REPORTED + observed.mallory_greeted
    assert exactly(calls["OK"] / failed["failed: DeadlineExceeded"], reported / BREAKER_FAILURES)
    assert retries["tenacity"] > 0
    assert exactly(
        calls["DeadlineExceeded"], failed["failed: DeadlineExceeded"] + retries["tenacity"]
    )
    assert retries["transparent (seen at the Logger)"] >= 0


def test_the_breaker_panel_shows_the_greeters_breaker_open(observed):
    states = observed.greeter["Logger breaker state"]
    assert states == {"A answered": 1, observed.greeter_instance: 2}


def test_exemplars_carry_the_trace_ids_of_real_traces(observed):
    assert all(re.fullmatch("[0-9a-f]{32}", t) for t in observed.exemplar_trace_ids)
    assert observed.trace_ids  # spans of those very traces reached the trace receiver


def test_prometheus_loads_every_alert_rule(observed):
    names = re.findall(r"- alert: (\w+)", (DEPLOY / "alerts.yml").read_text())
    assert observed.rules == dict.fromkeys(names, "ok")


def test_the_dashboard_script_checks_its_json():
    result = run_script(STEP_DIR, "dashboard.py", "--check")
    assert (result.returncode, result.stdout) == (0, "greeter.json is up to date\n")
