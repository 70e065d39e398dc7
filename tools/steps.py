"""Where the step folders are and how a command line names them ("05", "5" or the folder)."""

import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEP_DIR = re.compile(r"^step-(\d\d)_[a-z0-9_]+$")
# The folder of every step, built or not yet (DESIGN.md, "The steps"): names are fixed.
STEP_NAMES = [
    "step-01_basic_unary",
    "step-02_stream",
    "step-03_bidi_chat",
    "step-04_interceptors",
    "step-05_metadata_auth",
    "step-06_tls",
    "step-07_reflection_health",
    "step-08_prometheus",
    "step-09_tracing",
    "step-10_multi_service",
    "step-11_metadata_propagation",
    "step-12_load_balancing",
    "step-13_retry_timeout",
    "step-14_circuit_breaker",
    "step-15_grafana",
    "step-16_kafka_async",
    "step-17_versioned_canary",
    "step-18_rate_limiting",
    "step-19_rest_gateway",
    "step-20_cicd_kubernetes",
    "step-21_request_validation",
]


@dataclass(frozen=True)
class Step:
    number: int
    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def label(self) -> str:
        return f"{self.number:02d}"


def all_steps(root: Path = ROOT) -> list[Step]:
    steps = []
    for path in root.iterdir():
        match = STEP_DIR.match(path.name)
        if match and path.is_dir():
            steps.append(Step(int(match.group(1)), path))
    return sorted(steps, key=lambda step: step.number)


def find_step(selector: str, root: Path = ROOT) -> Step:
    for step in all_steps(root):
        if selector in (step.name, step.label) or (
            selector.isdigit() and int(selector) == step.number
        ):
            return step
    raise SystemExit(f"no step folder matches {selector!r} (try a number such as 01)")


def select_steps(selectors: list[str], root: Path = ROOT) -> list[Step]:
    """The steps named on the command line, or all of them when none is named."""
    if not selectors or selectors == [""]:
        return all_steps(root)
    return [find_step(s, root) for s in selectors]


if __name__ == "__main__":
    for step in select_steps(sys.argv[1:]):
        print(step.name)
