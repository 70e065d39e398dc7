"""Refresh the locks from pyproject.toml with pip-tools' pip-compile: every package pinned,
with the hashes of its files and a "via" note that says why it is there.

    requirements.lock           everything `make venv` installs (the dev extra included)
    requirements-runtime.lock   the services' packages only, for the image (Dockerfile)
    requirements-checkov.lock   checkov, the policy check of step 20's manifests, in an
                                environment of its own: it pins dozens of packages (boto3
                                among them) to versions of its own

The runtime lock is resolved against the full one, so a package has the same version in
both. pip-compile runs from a throw-away virtual env, so it is not part of the project's.
An install from a lock with hashes checks every file it downloads (pip's hash-checking mode).

Usage: python tools/lock.py            (or: make lock)
       python tools/lock.py --upgrade  (newer versions where pyproject.toml allows them)
"""

import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
RUNTIME_LOCK = ROOT / "requirements-runtime.lock"
CHECKOV_LOCK = ROOT / "requirements-checkov.lock"
CHECKOV = "checkov"
PIP_TOOLS = "pip-tools==7.7.0"
# The same for every lock: setuptools pinned too (grpcio-tools needs it at run time), and
# nothing of this machine's pip configuration (index URLs, wheel folders) written into it.
COMMON = [
    "--quiet",
    "--generate-hashes",
    "--allow-unsafe",
    "--strip-extras",
    "--no-emit-index-url",
    "--no-emit-find-links",
]


def main(argv: list[str]) -> int:
    upgrade = ["--upgrade"] if "--upgrade" in argv else []
    with tempfile.TemporaryDirectory() as tmp:
        venv.create(tmp, with_pip=True)
        python = str(Path(tmp) / "bin" / "python")
        subprocess.run([python, "-m", "pip", "install", "--quiet", PIP_TOOLS], check=True)
        compile_ = [python, "-m", "piptools", "compile", *COMMON, "pyproject.toml"]
        subprocess.run(
            [*compile_, *upgrade, "--extra", "dev", "--output-file", LOCK.name],
            cwd=ROOT,
            check=True,
        )
        subprocess.run(
            [*compile_, "--constraint", LOCK.name, "--output-file", RUNTIME_LOCK.name],
            cwd=ROOT,
            check=True,
        )
        subprocess.run(
            [*compile_[:-1], *upgrade, "--output-file", CHECKOV_LOCK.name, "-"],
            input=f"{CHECKOV}\n",
            text=True,
            cwd=ROOT,
            check=True,
        )
    for lock in (LOCK, RUNTIME_LOCK, CHECKOV_LOCK):
        pins = [line for line in lock.read_text().splitlines() if "==" in line]
        print(f"wrote {lock.name} ({len(pins)} packages, with hashes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
