"""Type-check every step's code with mypy (used by `make lint` and tests/test_lint.py).

    python tools/typecheck.py [NN ...]

Steps share module names (server, service, greeter.v1...), so mypy runs in each step folder
on its own, over the step's modules, with the settings of pyproject.toml ([tool.mypy]). The
generated gRPC code it imports is typed by its .pyi files (`make protos`: grpcio-tools types
the messages, mypy-protobuf the stubs and servicers). The steps' tests are not checked.
One cache serves every step, so the types of the standard library and of the packages are
read once; it lives in a temporary folder, never in the repository.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.processes import run_tool
from tools.steps import ROOT, select_steps


def main(argv: list[str]) -> int:
    failed = []
    with tempfile.TemporaryDirectory(prefix="mypy-cache-") as cache:
        for step in select_steps(argv):
            modules = sorted(path.name for path in step.path.glob("*.py"))
            settings = ["--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", cache]
            result = subprocess.run(
                [sys.executable, "-m", "mypy", *settings, *modules],
                cwd=step.path,
                capture_output=True,
                text=True,
            )
            if result.returncode == 0:
                print(f"{step.name}: ok")
            else:
                failed.append(step.name)
                print(f"{step.name}:\n{result.stdout}{result.stderr}", end="")
    if failed:
        print(f"type errors in {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_tool(main, sys.argv[1:], stopped=130))
