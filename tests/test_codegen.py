"""Checked-in generated files equal a fresh generation: the gRPC code (run `make protos` when
this fails) and, from step 15 on, the Grafana dashboard's JSON (run `python dashboard.py`)."""

import pytest

from tools.codegen import generate, is_generated
from tools.processes import run_script
from tools.steps import all_steps

DASHBOARD_STEPS = [s for s in all_steps() if (s.path / "dashboard.py").exists()]


def test_generated_code_is_fresh(step, tmp_path):
    generate(step.path, tmp_path)
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    checked_in = {
        p.relative_to(step.path): p.read_bytes()
        for p in step.path.rglob("*")
        if is_generated(p.name) and "protos" not in p.relative_to(step.path).parts
    }
    assert fresh, "protoc generated nothing"
    assert sorted(checked_in) == sorted(fresh), (
        "generated files missing or extra: run `make protos`"
    )
    stale = [str(name) for name in fresh if fresh[name] != checked_in[name]]
    assert not stale, f"stale generated code {stale}: run `make protos`"


@pytest.mark.parametrize("board_step", DASHBOARD_STEPS, ids=[s.label for s in DASHBOARD_STEPS])
def test_the_dashboard_json_is_fresh(board_step):
    result = run_script(board_step.path, "dashboard.py", "--check")
    assert result.returncode == 0, result.stderr
