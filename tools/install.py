"""Create .venv with exactly requirements.lock, every file checked against the lock's hashes,
and .venv/checkov with exactly requirements-checkov.lock (the policy check of step 20's
manifests: its pins clash with ours, so it has an environment of its own).

uv installs the lock: seconds, where pip takes most of a minute (it unpacks and compiles
every package one after the other; uv works in parallel). The bytecode is compiled at
install, as pip does: a process that may not write it (PYTHONDONTWRITEBYTECODE=1 is set on
the machines this project runs on) would otherwise compile every module it imports, each
time it starts. uv itself comes first, installed by pip from its own entry in the lock, so
it is hash-checked too. A download that stalls half-way (a read timeout from PyPI once
ended a CI run) is tried again, three times in all; what was fetched already comes from the
cache.

Usage: python3 tools/install.py    (make venv, and every make target, run it when the lock
                                    changes)
"""

import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
CHECKOV_LOCK = ROOT / "requirements-checkov.lock"
VENV = ROOT / ".venv"
CHECKOV_VENV = VENV / "checkov"  # its command: .venv/checkov/bin/checkov
LOG = VENV / "install.log"
ATTEMPTS = 3


def lock_entry(lock: str, package: str) -> str:
    """One package's entry of a pip-compile lock: its `name==version \\` line and the
    `--hash` lines that continue it."""
    lines = lock.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{package}=="))
    end = start + 1
    while end < len(lines) and lines[end - 1].endswith("\\"):
        end += 1
    return "\n".join(lines[start:end]) + "\n"


def run_with_retries(what: str, command: list[str]) -> None:
    for attempt in range(1, ATTEMPTS + 1):
        with LOG.open("w") as log:
            if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode == 0:
                return
        tail = LOG.read_text().splitlines()[-3:]
        if attempt == ATTEMPTS:
            sys.exit(f"{what} failed {ATTEMPTS} times; its output is in {LOG}:\n" + "\n".join(tail))
        print(f"{what} failed (attempt {attempt} of {ATTEMPTS}), trying again:", *tail, sep="\n")


def main() -> None:
    # A changed lock gets a fresh venv, so a package dropped from the lock is gone too.
    shutil.rmtree(VENV, ignore_errors=True)
    venv.create(VENV, with_pip=True)
    python = str(VENV / "bin" / "python")
    uv_entry = VENV / "uv-requirement.txt"
    uv_entry.write_text(lock_entry(LOCK.read_text(), "uv"))
    pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    run_with_retries("installing uv", [*pip, "--require-hashes", "--no-deps", "-r", str(uv_entry)])
    uv = [
        str(VENV / "bin" / "uv"),
        "pip",
        "sync",
        "--quiet",
        "--compile-bytecode",
        "--python",
        python,
    ]
    run_with_retries("installing requirements.lock", [*uv, "--require-hashes", str(LOCK)])
    venv.create(CHECKOV_VENV)  # without pip: uv installs into it
    checkov_python = str(CHECKOV_VENV / "bin" / "python")
    uv[uv.index(python)] = checkov_python
    run_with_retries(
        "installing requirements-checkov.lock", [*uv, "--require-hashes", str(CHECKOV_LOCK)]
    )


if __name__ == "__main__":
    main()
