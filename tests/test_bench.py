"""`make bench` works: one quick run on step 01 (and the bare server it is compared with)
writes a table with a row for each, with real figures, their medians and the chart. No
timing is asserted: a loaded machine is slower, never wrong."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys

from tools.processes import run_script
from tools.steps import ROOT


def test_a_quick_bench_of_step_01_writes_its_table(tmp_path):
    result = run_script(
        ROOT,
        "tools/bench.py",
        "01",
        *("--rounds", "1", "--seconds", "0.3", "--warmup", "0.2", "--out", str(tmp_path)),
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = (tmp_path / "results.md").read_text()
    assert re.search(r"\d+ cores \(", report), report
    rows = {
        cells[0]: cells
        for line in report.splitlines()
        if line.startswith("| ") and not line.startswith("| variant")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    assert sorted(rows) == ["01", "bare"], report
    for name, cells in rows.items():
        calls_16, calls_64, _, cpu = (float(cells[i].split()[0]) for i in (1, 2, 3, 4))
        assert calls_16 > 0 and calls_64 > 0 and cpu > 0, (name, cells)
        assert cells[-1] == "0", f"{name}: calls failed"
    assert rows["bare"][6] == "1.00" and rows["01"][5] == "1.00"  # each its own reference
    medians = json.loads((tmp_path / "results.json").read_text())["variants"]
    assert [row["name"] for row in medians] == ["bare", "01"]
    for row in medians:
        assert row["cpu_us_per_call_min"] <= row["cpu_us_per_call"] <= row["cpu_us_per_call_max"]
    assert (tmp_path / "cost.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_a_quick_leak_check_of_step_03_writes_its_table(tmp_path):
    result = run_script(
        ROOT, "tools/bench.py", "leaks", "03", "--calls", "200", "--out", str(tmp_path), timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [row] = [
        line
        for line in (tmp_path / "leaks.md").read_text().splitlines()
        if line.startswith("| 03 ")
    ]
    before, after_unary, after_chats, change = (float(c) for c in row.strip("|").split("|")[1:])
    assert before > 0 and after_unary > 0 and after_chats > 0
    assert abs(change - (after_chats - before)) < 0.11  # each figure is rounded to 0.1


def test_a_step_served_for_a_profiler_takes_the_load_it_prints_and_stops_on_ctrl_c():
    """`bench.py serve 06` (auth and TLS: the printed command carries the token and the CA)
    as bench/README.md's "Profile a step yourself" uses it."""
    serve = subprocess.Popen(
        [sys.executable, "tools/bench.py", "serve", "06"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        printed = []
        for line in serve.stdout:
            printed.append(line)
            if line.startswith("load it: "):
                break
        [greeter] = [line for line in printed if line.startswith("greeter: pid ")]
        pid = int(greeter.split()[-1])
        words = shlex.split(printed[-1].removeprefix("load it: "))
        python = words.index("python")
        env = dict(word.split("=", 1) for word in words[:python])
        arguments = words[python + 1 :]
        assert env["BENCH_TOKEN"], printed
        # The printed load, made short: --calls counts calls instead of a time window.
        load = subprocess.run(
            [sys.executable, *arguments, "--calls", "50"],
            cwd=ROOT,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert load.returncode == 0, load.stderr
        assert json.loads(load.stdout.splitlines()[-1])["errors"] == 0
        serve.send_signal(signal.SIGINT)
        assert serve.wait(timeout=30) == 0
        assert not os.path.exists(f"/proc/{pid}"), "the Greeter outlived the bench"
    finally:
        serve.kill()
        serve.wait()
