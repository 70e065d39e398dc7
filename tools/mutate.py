"""Mutation testing: how many small bugs in one step's module that step's tests catch.

    python tools/mutate.py NN MODULE [--tests tests/test_x.py ...] [--sample N]
                                                           (make mutate STEP=NN MODULE=x)

cosmic-ray (https://cosmic-ray.readthedocs.io) makes each small change its operators know to
the module, one at a time: a comparison flipped, a number moved by one, a condition negated,
a `break` made `continue`. After each change it runs the tests. A change that the tests still
pass with is a mutant that survived: a behaviour nothing checks. cosmic-ray edits the module
in place, so it works on a copy of the step in a temporary folder, and the step in the
repository is never touched.

The tests are the module's own file (tests/test_MODULE.py) unless --tests names others;
pytest stops at the first failure (-x), so a killed mutant costs little. The report ends with
the kill rate, then each survivor as a diff: kill it with a test, or judge it equivalent
(the same behaviour, spelled differently) and say why.
"""

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.processes import ToolError, run_tool, stop_process_group
from tools.steps import ROOT, select_steps

COSMIC_RAY = Path(sys.executable).with_name("cosmic-ray")
CR_REPORT = Path(sys.executable).with_name("cr-report")
LEFT_BEHIND = shutil.ignore_patterns("__pycache__", ".pytest_cache", ".mypy_cache", "certs")


def run(command: list[str], cwd: Path) -> str:
    """Run `command` in a process group of its own, stopped with everything it started if
    the tool is stopped; its output, or a ToolError with it if it failed."""
    process = subprocess.Popen(
        command,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate()
    except BaseException:
        stop_process_group(process)
        raise
    if process.returncode != 0:
        raise ToolError(f"{Path(command[0]).name} {command[1]} failed:\n{output}")
    return output


def config(module: str, tests: list[str], timeout: float) -> str:
    test_command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    return "\n".join(
        [
            "[cosmic-ray]",
            f'module-path = "{module}.py"',
            f"timeout = {timeout}",
            "excluded-modules = []",
            f'test-command = "{" ".join(test_command)}"',
            "",
            "[cosmic-ray.distributor]",
            'name = "local"',
            "",
        ]
    )


def keep_a_sample(session: str, size: int, seed: int) -> int:
    """Leave `size` of the session's mutants, chosen at random with `seed`, and drop the
    others; returns how many there were."""
    from cosmic_ray.work_db import WorkDB, use_db

    with use_db(session, WorkDB.Mode.open) as db:
        items = list(db.work_items)
        kept = random.Random(seed).sample(items, min(size, len(items)))
        db.clear()
        db.add_work_items(kept)
    return len(items)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", metavar="NN")
    parser.add_argument("module", help="a module of the step, without .py: breaker")
    parser.add_argument("--tests", nargs="+", help="test files (default: tests/test_MODULE.py)")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds before a test run counts as hung"
    )
    parser.add_argument(
        "--sample",
        type=int,
        metavar="N",
        help="run a random sample of N mutants (for a module with hundreds), not all",
    )
    parser.add_argument("--seed", type=int, default=23, help="the sample's seed (default 23)")
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    [step] = select_steps([args.step], args.root)
    if not (step.path / f"{args.module}.py").exists():
        raise ToolError(f"{step.name} has no {args.module}.py")
    tests = args.tests or [f"tests/test_{args.module}.py"]
    for test in tests:
        if not (step.path / test).exists():
            raise ToolError(f"{step.name} has no {test}: name the module's tests with --tests")
    with tempfile.TemporaryDirectory(prefix=f"mutate-{step.label}-") as tmp:
        # The copy sits where the step does, beside what its tests import from the repo.
        work = Path(tmp)
        shutil.copytree(step.path, work / step.name, ignore=LEFT_BEHIND)
        shutil.copy(ROOT / "pyproject.toml", work)
        for shared in ("tools", "tests"):
            (work / shared).symlink_to(args.root / shared)
        (work / "cosmic-ray.toml").write_text(config(args.module, tests, args.timeout))
        session, config_file = str(work / "session.sqlite"), str(work / "cosmic-ray.toml")
        copy = work / step.name
        started = time.monotonic()
        run([str(COSMIC_RAY), "init", config_file, session], copy)
        made = keep_a_sample(session, args.sample, args.seed) if args.sample else None
        print(f"{step.name}/{args.module}.py against {' '.join(tests)}", flush=True)
        if made is not None:
            print(f"a sample of {args.sample} of its {made} mutants (seed {args.seed})", flush=True)
        run([str(COSMIC_RAY), "baseline", config_file], copy)  # the tests pass unmutated
        run([str(COSMIC_RAY), "exec", config_file, session], copy)
        report = run([str(CR_REPORT), "--show-diff", "--surviving-only", session], copy)
        print(report.rstrip())
        print(f"({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main, sys.argv[1:], stopped=130))
