"""Run every step's tests, each step in its own pytest process, and the repo-level tests.

    python tools/run_tests.py [NN]      (make test [STEP=NN])

Steps share module names (server, service, greeter.v1...), so one process cannot import two
steps: each gets its own, and two more than the CPU cores run at once (`--jobs`: a suite
waits for servers, brokers and deadlines about 40% of its time), the latest (and longest)
steps first. The repo-level tests (tests/) are one more run among them, in a full run only.
Prints a line per run as it finishes, then the output of every failed run, a summary table
and the slowest tests; exits 1 if anything failed. With CI=true a skipped test counts as a
failure: CI must have every real component the tests use.
"""

import argparse
import compileall
import os
import py_compile
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.processes import run_tool, stop_process_group
from tools.steps import ROOT, select_steps


@dataclass
class Run:
    name: str
    directory: Path
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    output: str = ""
    problem: str = ""  # why the run counts as failed beyond failed tests
    durations: list[tuple[float, str]] = field(default_factory=list)  # (seconds, test id)

    @property
    def ok(self) -> bool:
        return self.failed == 0 and not self.problem


RUNNING: set[subprocess.Popen] = set()  # the pytest processes running now


def stop_running() -> None:
    """Stop every pytest still running, and all that each one started."""
    for process in list(RUNNING):
        stop_process_group(process)


def compile_modules(directories: list[Path]) -> None:
    """Compile every module of `directories` once, before the runs. The tests start servers
    and clients by the thousand, and where Python may not write bytecode
    (PYTHONDONTWRITEBYTECODE=1, as on this project's machines) each start compiled the
    step's own modules again: 0.3 s of CPU of a step 17 server's 0.55 s, 0.2 s of its
    client's 0.35 s. Checked-hash files: a module edited since (a mutant, a test's copy)
    is compiled from its source, never taken from a stale file."""
    for directory in filter(Path.is_dir, directories):
        compileall.compile_dir(
            directory,
            quiet=1,
            workers=0,  # one per core
            invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH,
        )


def run_pytest(run: Run, ci: bool) -> Run:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        started = time.monotonic()
        # A process group of its own: stopping the runner stops each pytest and every
        # server, broker and proxy its tests started (stop_running).
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                f"--junitxml={report}",
                "-o",
                "junit_family=xunit1",
            ],
            cwd=run.directory,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        RUNNING.add(process)
        try:
            run.output, _ = process.communicate()
        finally:
            RUNNING.discard(process)
        run.seconds = time.monotonic() - started
        if report.exists():
            suite = ET.parse(report).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            total = int(suite.get("tests", 0))
            run.failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
            run.skipped = int(suite.get("skipped", 0))
            run.passed = total - run.failed - run.skipped
            run.durations = [
                (float(case.get("time", 0)), f"{case.get('classname')}::{case.get('name')}")
                for case in suite.iter("testcase")
            ]
    if process.returncode == 5 or run.passed + run.failed + run.skipped == 0:
        run.problem = "no tests ran"
    elif process.returncode != 0 and run.failed == 0:
        run.problem = f"pytest exited with {process.returncode}"
    elif ci and run.skipped:
        run.problem = f"{run.skipped} skipped (CI=true: every test must run)"
    return run


def print_line(run: Run) -> Run:
    """One line for a finished run, printed the moment it finishes."""
    verdict = "ok" if run.ok else f"FAILED ({run.problem or f'{run.failed} failed'})"
    print(
        f"{run.name}: {verdict}, {run.passed} passed, {run.failed} failed, "
        f"{run.skipped} skipped in {run.seconds:.1f}s",
        flush=True,
    )
    return run


def print_summary(runs: list[Run], seconds: float) -> None:
    width = max(len(r.name) for r in runs)
    print(f"\n{'run':<{width}}  {'passed':>6}  {'failed':>6}  {'skipped':>7}  {'seconds':>7}")
    for r in runs:
        mark = "" if r.ok else f"  ✗ {r.problem or 'FAILED'}"
        print(
            f"{r.name:<{width}}  {r.passed:>6}  {r.failed:>6}  {r.skipped:>7}  {r.seconds:>7.1f}{mark}"
        )
    passed = sum(r.passed for r in runs)
    failed = sum(r.failed for r in runs)
    skipped = sum(r.skipped for r in runs)
    print(f"{'total':<{width}}  {passed:>6}  {failed:>6}  {skipped:>7}  {seconds:>7.1f}")
    print_slowest(runs)
    # The plain closing line CI systems look for.
    print(f"\n{passed} passed, {failed} failed, {skipped} skipped")


SLOWEST_SHOWN = 20


def print_slowest(runs: list[Run]) -> None:
    """Where the time goes: the slowest tests of every run (setup and teardown included)."""
    timed = sorted(
        ((seconds, f"{r.name}: {test}") for r in runs for seconds, test in r.durations),
        reverse=True,
    )
    if not timed:
        return
    total = sum(seconds for seconds, _ in timed)
    shown = timed[:SLOWEST_SHOWN]
    print(
        f"\nthe {len(shown)} slowest of {len(timed)} tests "
        f"({sum(s for s, _ in shown):.0f} s of {total:.0f} s in tests):"
    )
    for seconds, test in shown:
        print(f"{seconds:7.1f}s  {test}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Run every step's tests, then the repo tests.")
    parser.add_argument("steps", nargs="*", metavar="NN")
    parser.add_argument(
        "--jobs",
        type=int,
        default=(os.cpu_count() or 1) + 2,
        help="test runs at once (default: two more than the CPU cores)",
    )
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    ci = os.environ.get("CI") == "true"
    started = time.monotonic()
    steps = select_steps(args.steps, args.root)
    runs = [Run(step.name, step.path) for step in steps]
    compile_modules([step.path for step in steps] + [args.root / "tools", args.root / "tests"])
    # Two runs more than the cores: a suite waits for a third of its time (step 17's alone
    # keeps a core 64% busy); with three runs at a time on 2 cores the cores were 74% busy
    # and `make test` took 589-632 s, with four 536 s (December 2026). Five were quicker
    # with 18 steps (509-569 s), but with step 19 they put its suite and steps 16-18's,
    # each with Envoy, brokers and a dozen servers, on 2 cores at once: a greeting took
    # twice its bound and replicas missed their round-robin turn (4 failures in one run of
    # three). Four keep a machine busy without starving what a test times.
    pool = ThreadPoolExecutor(max_workers=max(1, args.jobs))
    # Longest first: a later step carries every earlier test and takes longer, and two long
    # suites left for the end would run with a core idle beside the last one (on 2 cores,
    # 17 steps: 655 s instead of 708 s of their 1,409 s).
    longest_first = sorted(runs, key=lambda r: r.name, reverse=True)
    repo_tests = args.root / "tests"
    if not args.steps and repo_tests.is_dir():  # the repo-level tests belong to a full run only
        # As long as the two latest steps' suites (140 s of 1,454 s on 2 cores, December
        # 2026): third in line. Run last, alone, they kept a core idle for two minutes.
        repo = Run("tests (repo)", repo_tests)
        longest_first.insert(min(2, len(longest_first)), repo)
        runs.append(repo)
    try:
        for finished in as_completed([pool.submit(run_pytest, r, ci) for r in longest_first]):
            print_line(finished.result())
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM or SIGHUP (run_tool)
        print("stopping the test runs ...", flush=True)
        pool.shutdown(wait=False, cancel_futures=True)
        stop_running()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    for r in runs:
        if not r.ok:
            print(f"\n===== {r.name} FAILED ({r.seconds:.1f}s) =====")
            print(r.output.rstrip())
    print_summary(runs, time.monotonic() - started)
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(run_tool(main, sys.argv[1:], stopped=130))
