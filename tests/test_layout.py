"""The shape every step folder has (DESIGN.md, "Layout")."""

import ast
import importlib.metadata
import subprocess
import sys

from tools.codegen import is_generated
from tools.steps import ROOT, STEP_NAMES

REQUIRED_FILES = [
    "README.md",
    "protos/greeter/v1/greeter.proto",
    "greeter/v1/greeter_pb2.py",
    "greeter/v1/greeter_pb2_grpc.py",
    "greeter/v1/greeter_pb2.pyi",
    "greeter/v1/greeter_pb2_grpc.pyi",
    "server.py",
    "client.py",
    "tests/conftest.py",
    "tests/helpers.py",
    "tests/test_unary.py",
]


def test_step_folders_have_their_fixed_names(steps):
    assert [s.name for s in steps] == STEP_NAMES[: len(steps)]


def test_steps_are_numbered_contiguously_from_01(steps):
    assert steps, "no step folders found"
    assert [s.number for s in steps] == list(range(1, len(steps) + 1))


def test_step_has_the_files_of_the_design(step):
    missing = [name for name in REQUIRED_FILES if not (step.path / name).is_file()]
    assert not missing, f"{step.name} lacks {missing}"


def test_proto_package_is_greeter_v1(step):
    assert "package greeter.v1;" in (step.path / "protos/greeter/v1/greeter.proto").read_text()


def imported_top_level_names(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                yield node.lineno, "." * node.level + (node.module or "")
            else:
                yield node.lineno, node.module.split(".")[0]


def test_runtime_code_imports_only_its_own_folder_and_installed_packages(step):
    """A learner copies one folder: its runtime code must not reach into tools/, tests/ or
    another step. (Test code may use the shared fixtures of tests/support.)"""
    local = {p.stem for p in step.path.glob("*.py")} | {
        p.name for p in step.path.iterdir() if p.is_dir() and p.name != "tests"
    }
    installed = set(importlib.metadata.packages_distributions())
    allowed = set(sys.stdlib_module_names) | installed | local
    forbidden = {p.name for p in ROOT.iterdir() if p.is_dir()} - local
    problems = []
    for path in step.path.rglob("*.py"):
        relative = path.relative_to(step.path)
        if relative.parts[0] == "tests":
            continue
        for line, name in imported_top_level_names(path):
            if name.startswith(".") or name in forbidden or name not in allowed:
                problems.append(f"{relative}:{line} imports {name}")
    assert not problems


def test_generated_code_is_only_under_the_proto_packages(step):
    for path in step.path.rglob("*"):
        if is_generated(path.name):
            assert path.relative_to(step.path).parts[0] != "protos"


def test_no_key_or_certificate_is_committed():
    """Keys and certificates are made on each machine (gen_certs.sh), never committed."""
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    secret_like = [
        name for name in tracked.splitlines() if name.endswith((".key", ".crt", ".pem", ".srl"))
    ]
    assert not secret_like
