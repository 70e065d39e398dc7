"""The set-up the two commands do: a virtual env installed from an exact lock, once."""

import re
import subprocess
import tomllib

from tools.steps import ROOT

LOCK = ROOT / "requirements.lock"


def locked_packages() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not an exact pin: {line!r}"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_the_lock_pins_every_dependency_of_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    names = {re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[ ;]", name)[0]).lower() for name in wanted}
    assert names <= set(locked_packages()), "run `make lock`"


def test_a_second_run_does_not_reinstall():
    """make's own question: is .venv up to date with the lock? (`make -q` runs nothing.)"""
    assert subprocess.run(["make", "-q", "venv"], cwd=ROOT).returncode == 0
