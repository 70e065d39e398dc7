"""The Grafana dashboard of the Greeter and the Logger, as code (grafana-foundation-sdk).

    python dashboard.py            writes deploy/grafana/dashboards/greeter.json
    python dashboard.py --check    exits 1 when that file is not what this code builds

Grafana loads the JSON file (deploy/grafana/provisioning/). This module is its source: a
change to a panel is a change here, reviewed as code, and the JSON is rebuilt from it.
Every query reads the go-grpc-prometheus series of metrics.py, so the dashboard also fits a
Go service. See step 15's README, "The dashboard".
"""

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import (
    dashboard,
    heatmap,
    prometheus,
    statetimeline,
    timeseries,
)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    ValueMap,
    ValueMappingResult,
    VariableOption,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

OUTPUT = Path(__file__).parent / "deploy" / "grafana" / "dashboards" / "greeter.json"
# The data sources' uids, as deploy/grafana/provisioning/datasources/datasources.yml names them.
PROMETHEUS = DataSourceRef(type_val="prometheus", uid="prometheus")

# Every query of the first row is about the service the `service` variable selects.
SERVICE = 'grpc_service="$service"'
# Grafana's rate window: at least 4 scrapes, whatever the zoom.
RATE = "[$__rate_interval]"
LOGGER_RECORD = 'grpc_service="logger.v1.Logger", grpc_method="Record"'


def query(ref_id: str, expr: str, legend: str) -> prometheus.Dataquery:
    return (
        prometheus.Dataquery()
        .ref_id(ref_id)
        .expr(" ".join(expr.split()))  # written over several lines here, one in the JSON
        .legend_format(legend)
        .datasource(PROMETHEUS)
    )


def graph(title: str, unit: str, description: str, *targets: prometheus.Dataquery):
    panel = timeseries.Panel().title(title).description(description).unit(unit)
    panel = panel.datasource(PROMETHEUS).span(12).height(8)
    for target in targets:
        panel = panel.with_target(target)
    return panel


def quantile(ref_id: str, q: float) -> prometheus.Dataquery:
    # Exemplars: each dot on the graph is one call, with the trace id metrics.py attached to
    # its observation; Grafana links it to the trace in Jaeger (datasources.yml).
    return query(
        ref_id,
        f"""histogram_quantile({q}, sum by (le, grpc_method) (
              rate(grpc_server_handling_seconds_bucket{{{SERVICE}}}{RATE})))""",
        f"{{{{grpc_method}}}} p{round(q * 100)}",
    ).exemplar(True)


def per_stream(ref_id: str, messages: str, legend: str) -> prometheus.Dataquery:
    return query(
        ref_id,
        f"""sum by (grpc_method) (rate({messages}{{{SERVICE}, grpc_type!="unary"}}{RATE}))
            / sum by (grpc_method) (rate(grpc_server_handled_total{{{SERVICE}, grpc_type!="unary"}}{RATE}))""",
        legend,
    )


def service_panels() -> list:
    return [
        graph(
            "Request rate",
            "reqps",
            "Calls finished per second, by method.",
            query(
                "A",
                f"sum by (grpc_method) (rate(grpc_server_handled_total{{{SERVICE}}}{RATE}))",
                "{{grpc_method}}",
            ),
        ),
        graph(
            "Error ratio by code",
            "percentunit",
            "The share of each method's calls that ended with each code other than OK.",
            query(
                "A",
                f"""(sum by (grpc_method, grpc_code) (
                      rate(grpc_server_handled_total{{{SERVICE}, grpc_code!="OK"}}{RATE})) > 0)
                    / ignoring (grpc_code) group_left
                    sum by (grpc_method) (rate(grpc_server_handled_total{{{SERVICE}}}{RATE}))""",
                "{{grpc_method}} {{grpc_code}}",
            ),
        ),
        graph(
            "Latency p50, p95, p99",
            "s",
            "From the handling-time histogram; a stream lasts as long as its caller keeps it.",
            quantile("A", 0.5),
            quantile("B", 0.95),
            quantile("C", 0.99),
        ),
        heatmap.Panel()
        .title("Latency heatmap")
        .description("How many calls fell in each bucket of the handling-time histogram.")
        .datasource(PROMETHEUS)
        .span(12)
        .height(8)
        .with_target(
            query(
                "A",
                f"sum by (le) (rate(grpc_server_handling_seconds_bucket{{{SERVICE}}}{RATE}))",
                "{{le}}",
            )
            .format(PromQueryFormat.HEATMAP)
            .exemplar(True)
        ),
        graph(
            "In-flight calls",
            "short",
            "Calls started and not finished yet: a stream or chat counts while it is open.",
            query(
                "A",
                f"""sum by (grpc_method) (grpc_server_started_total{{{SERVICE}}})
                    - sum by (grpc_method) (grpc_server_handled_total{{{SERVICE}}})""",
                "{{grpc_method}}",
            ),
        ),
        graph(
            "Messages per stream",
            "short",
            "Messages each finished stream or chat carried, on average.",
            per_stream("A", "grpc_server_msg_sent_total", "{{grpc_method}} sent"),
            per_stream("B", "grpc_server_msg_received_total", "{{grpc_method}} received"),
        ),
        graph(
            "Rate-limited calls",
            "reqps",
            "Calls refused with RESOURCE_EXHAUSTED by a rate limit (ratelimit.py), by method "
            "and limit: per_user (the Greeter) or per_service (the Logger).",
            query(
                "A",
                f"sum by (grpc_method, limit) (rate(ratelimit_refused_total{{{SERVICE}}}{RATE}))",
                "{{grpc_method}} {{limit}}",
            ),
        ),
    ]


def breaker_state():
    states = {"0": ("closed", "green"), "1": ("half-open", "yellow"), "2": ("open", "red")}
    mapping = ValueMap(
        {v: ValueMappingResult(text=t, color=c, index=int(v)) for v, (t, c) in states.items()}
    )
    return (
        statetimeline.Panel()
        .title("Logger breaker state")
        .description("Each Greeter's circuit breaker around the Logger (breaker.py).")
        .datasource(PROMETHEUS)
        .span(12)
        .height(8)
        .mappings([mapping])
        .with_target(query("A", "max by (instance) (greeter_logger_breaker_state)", "{{instance}}"))
    )


def logger_panels() -> list:
    return [
        graph(
            "Logger calls by code",
            "reqps",
            "The Greeter's calls to the Logger, as its client sees them.",
            query(
                "A",
                f"""sum by (grpc_code) (
                      rate(grpc_client_handled_total{{{LOGGER_RECORD}}}{RATE})) > 0""",
                "{{grpc_code}}",
            ),
        ),
        graph(
            "Greetings not logged",
            "reqps",
            "Reports that failed, by the code of the failed call, and reports the breaker skipped.",
            query(
                "A",
                f"sum by (grpc_code) (rate(greeter_unlogged_greetings_total{RATE})) > 0",
                "failed: {{grpc_code}}",
            ),
            query(
                "B",
                f"sum(rate(greeter_logger_breaker_skipped_total{RATE}))",
                "skipped: breaker open",
            ),
        ),
        graph(
            "Logger retries",
            "reqps",
            "The Greeter's own attempts after the first (tenacity), and gRPC's transparent "
            "retries that reached a Logger: attempts it started minus calls the Greeter made.",
            query("A", f"sum(rate(greeter_logger_report_retries_total{RATE}))", "tenacity"),
            query(
                "B",
                f"""clamp_min(sum(rate(grpc_server_started_total{{{LOGGER_RECORD}}}{RATE}))
                    - sum(rate(grpc_client_started_total{{{LOGGER_RECORD}}}{RATE})), 0)""",
                "transparent (seen at the Logger)",
            ),
        ),
        breaker_state(),
    ]


def build() -> dict:
    service = (
        dashboard.QueryVariable("service")
        .label("Service")
        .description("The gRPC service of the first row's panels.")
        .datasource(PROMETHEUS)
        .query("label_values(grpc_server_handled_total, grpc_service)")
        .regex("/^(greeter|logger)\\..*/")  # the services of this repo, not health or reflection
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
        .current(VariableOption(text="greeter.v1.Greeter", value="greeter.v1.Greeter"))
    )
    board = (
        dashboard.Dashboard("gRPC Mastery: Greeter and Logger")
        .uid("grpc-mastery-greeter")
        .tags(["grpc", "grpc-mastery"])
        .refresh("10s")
        .time("now-30m", "now")
        .with_variable(service)
    )
    # Ids in the order of the page: Grafana links to a panel by its id (`viewPanel=3`).
    rows = [("$service", service_panels()), ("The Greeter's calls to the Logger", logger_panels())]
    ids = iter(range(1, 100))
    for title, panels in rows:
        board = board.with_row(dashboard.Row(title).id(next(ids)))
        for panel in panels:
            board = board.with_panel(panel.id(next(ids)))
    return json.loads(json.dumps(board.build(), cls=JSONEncoder))


def rendered() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the Grafana dashboard's JSON.")
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    fresh = rendered()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != fresh:
            print(f"{OUTPUT.name} is stale: run `python dashboard.py`", file=sys.stderr)
            return 1
        print(f"{OUTPUT.name} is up to date")
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(fresh)
    print(f"wrote {OUTPUT.relative_to(Path(__file__).parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
