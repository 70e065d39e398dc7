"""A Grafana dashboard's queries, run against a real Prometheus: what each panel would show.

Shared by the tour (a table of every panel's current values) and the steps' tests (every
panel's PromQL returns data). Grafana's own variables are filled in as Grafana would:
`$service` from the values given, `$__rate_interval` with a window that holds every scrape.
"""

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from tools.prometheus import PrometheusProcess

# Grafana makes $__rate_interval at least 4 scrape intervals; the tour and the tests scrape
# every second and ask within a minute of starting, so one minute covers every sample.
RATE_INTERVAL = "1m"
VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


@dataclass(frozen=True)
class Target:
    panel: str  # the panel's title
    ref_id: str
    expr: str  # as written in the dashboard, variables and all
    legend: str
    datasource_uid: str | None
    value_texts: tuple[tuple[str, str], ...] = ()  # the panel's value mappings: ("2", "open")


@dataclass(frozen=True)
class Series:
    target: Target
    name: str  # the legend, filled in with the series' labels
    value: float


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def targets(dashboard: dict) -> list[Target]:
    """Every query of every panel, rows' panels included, in the order of the page."""
    found = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            mappings = inner.get("fieldConfig", {}).get("defaults", {}).get("mappings", [])
            texts = tuple(
                (value, result["text"])
                for mapping in mappings
                if mapping["type"] == "value"
                for value, result in mapping["options"].items()
            )
            for target in inner.get("targets", []):
                found.append(
                    Target(
                        inner["title"],
                        target.get("refId", ""),
                        target.get("expr", ""),
                        target.get("legendFormat", ""),
                        target.get("datasource", {}).get("uid"),
                        texts,
                    )
                )
    return found


def substitute(expr: str, variables: dict[str, str]) -> str:
    """`expr` with Grafana's variables filled in; an unknown variable is an error."""
    values = {"__rate_interval": RATE_INTERVAL, "__interval": "15s", **variables}

    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"no value for ${name} in {expr}")
        return values[name]

    return VARIABLE.sub(value, expr)


def legend(legend_format: str, labels: dict[str, str]) -> str:
    """Grafana's `{{label}}` legend, filled in."""
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), legend_format)


def evaluate(
    prometheus: PrometheusProcess, dashboard: dict, variables: dict[str, str]
) -> dict[Target, list[Series]]:
    """Each target's series as Prometheus answers its query now. All are asked about the same
    moment, as Grafana does: rates extrapolate to the end of their window, and queries of
    different moments would not add up."""
    answers, now = {}, time.time()
    for target in targets(dashboard):
        result = prometheus.query(substitute(target.expr, variables), at=now)
        answers[target] = [
            Series(target, legend(target.legend, r["metric"]), float(r["value"][1])) for r in result
        ]
    return answers


def table(answers: dict[Target, list[Series]]) -> str:
    """One line per series: panel, legend, value (NaN: no calls to divide by), with the
    panel's value mappings applied (a breaker state of 2 reads "open")."""
    rows = [("panel", "series", "value")]
    for target, series in answers.items():
        if not series:
            rows.append((target.panel, f"{target.ref_id}: no data", ""))
        texts = dict(target.value_texts)
        for s in sorted(series, key=lambda s: s.name):
            shown = f"{s.value:.4g}"
            rows.append((target.panel, s.name or target.ref_id, texts.get(shown, shown)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        f"{p:<{widths[0]}}  {n:<{widths[1]}}  {v:>{widths[2]}}".rstrip() for p, n, v in rows
    )
