"""The set-up the two commands do: a virtual env installed from an exact lock with hashes,
once; and the image's lock, the same versions without the development tools."""

import re
import subprocess
import tomllib

from tools import install
from tools.steps import ROOT

LOCK = ROOT / "requirements.lock"
RUNTIME_LOCK = ROOT / "requirements-runtime.lock"
CHECKOV_LOCK = ROOT / "requirements-checkov.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)==(\S+)")


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_packages(lock) -> dict[str, list[str]]:
    """{package: [its version, then the hashes listed under it]} as pip-compile writes them."""
    pins: dict[str, list[str]] = {}
    current = None
    for line in lock.read_text().splitlines():
        if match := PIN.match(line):
            current = normalized(match.group(1))
            pins[current] = [match.group(2)]
        elif current and (hashed := re.search(r"--hash=(sha256:[0-9a-f]{64})", line)):
            pins[current].append(hashed.group(1))
        elif line.strip() and not line.lstrip().startswith("#"):
            assert line.startswith(" ") or line.startswith("\t"), f"not a pin: {line!r}"
    return pins


def project_names(*groups: str) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [
        name
        for group in groups
        for name in (
            project["dependencies"]
            if group == "runtime"
            else project["optional-dependencies"][group]
        )
    ]
    return {normalized(re.split(r"[<>=!~\[ ;]", name)[0]) for name in wanted}


def test_the_lock_pins_every_dependency_of_pyproject():
    assert project_names("runtime", "dev") <= set(locked_packages(LOCK)), "run `make lock`"


def test_every_locked_package_has_its_hashes():
    for lock in (LOCK, RUNTIME_LOCK, CHECKOV_LOCK):
        unhashed = [name for name, (_, *hashes) in locked_packages(lock).items() if not hashes]
        assert not unhashed, f"{lock.name}: no hashes for {unhashed}"
    assert "setuptools" in locked_packages(LOCK), "grpcio-tools needs it: pinned too"


def test_the_runtime_lock_has_the_full_locks_versions_for_the_services_only():
    full, runtime = locked_packages(LOCK), locked_packages(RUNTIME_LOCK)
    assert project_names("runtime") <= set(runtime), "run `make lock`"
    assert {name: pin[0] for name, pin in runtime.items()} == {
        name: full[name][0] for name in runtime
    }
    assert not project_names("dev") & set(runtime), "a development tool in the image's lock"
    assert "grpcio-tools" not in runtime, "the image needs no protoc: the code is generated"


def test_checkov_has_a_lock_and_an_environment_of_its_own():
    """Its pins clash with the project's (boto3, for one): tools/install.py puts it in
    .venv/checkov, from requirements-checkov.lock, and nothing of it in .venv itself."""
    assert "checkov" in locked_packages(CHECKOV_LOCK)
    assert "checkov" not in locked_packages(LOCK)
    checkov = ROOT / ".venv" / "checkov" / "bin" / "checkov"
    version = subprocess.run([checkov, "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == locked_packages(CHECKOV_LOCK)["checkov"][0]


def test_the_installer_takes_uv_from_the_lock_with_every_hash(tmp_path):
    """tools/install.py installs uv with pip first, from uv's own entry in the lock."""
    entry = tmp_path / "uv.txt"
    entry.write_text(install.lock_entry(LOCK.read_text(), "uv"))
    assert locked_packages(entry) == {"uv": locked_packages(LOCK)["uv"]}
    assert len(locked_packages(LOCK)["uv"]) > 2, "a version and the hashes of its wheels"


def test_a_second_run_does_not_reinstall():
    """make's own question: is .venv up to date with the lock? (`make -q` runs nothing.)"""
    assert subprocess.run(["make", "-q", "venv"], cwd=ROOT).returncode == 0
