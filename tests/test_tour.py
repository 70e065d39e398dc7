"""The tour runs every step and prints the line that shows its feature working, the way
grpc-go's examples_test.sh greps the output of each example."""

import subprocess
import sys

from tools.steps import ROOT

KEY_LINES = {
    1: "Hello, Ada!",
    2: "Hello, Ada! (3/3)",
    3: "Hello, Grace!",
    4: "INFO greeter.rpc: /greeter.v1.Greeter/SayHello code=INVALID_ARGUMENT peer=ipv4:127.0.0.1:",
    5: "error: UNAUTHENTICATED: invalid token",
    6: "CERTIFICATE_VERIFY_FAILED",
    7: '"status": "SERVING"',
}


def test_tour_runs_the_step_and_shows_its_key_line(step):
    assert step.number in KEY_LINES, f"add the key line of {step.name} to KEY_LINES"
    result = subprocess.run(
        [sys.executable, "tools/tour.py", step.label],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"✓ step {step.label}" in result.stdout
    assert any(KEY_LINES[step.number] in line for line in result.stdout.splitlines()), result.stdout
