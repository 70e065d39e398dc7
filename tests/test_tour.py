"""The tour runs every step and prints the line that shows its feature working (the entry's
`shows`), the way grpc-go's examples_test.sh greps the output of each example."""

import subprocess
import sys

from tools.steps import ROOT
from tools.tour import TOUR


def test_tour_runs_the_step_and_shows_its_key_line(step):
    assert step.number in TOUR, f"add a tour entry for {step.name} to tools/tour.py"
    result = subprocess.run(
        [sys.executable, "tools/tour.py", step.label],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"✓ step {step.label}" in result.stdout
    shows = TOUR[step.number].shows
    assert any(shows in line for line in result.stdout.splitlines()), result.stdout
