"""The ladder: step N is step N-1 plus one feature, and says so."""

import ast
import shutil
import subprocess
import sys

import pytest

from tests.support.helpers import require_binary
from tests.support.readme import what_changed
from tools.ladder import changed_files
from tools.steps import ROOT


@pytest.fixture(scope="module")
def learner_certificates(steps):
    """certs/ made by ./gen_certs.sh in every step that has the script, as a learner who
    follows the README has it; removed afterwards (a learner's own certs/ is left alone)."""
    require_binary("openssl", "sudo apt-get install openssl (Debian/Ubuntu)")
    made = []
    for step in steps:
        if (step.path / "gen_certs.sh").exists() and not (step.path / "certs").exists():
            subprocess.run(["bash", "gen_certs.sh"], cwd=step.path, check=True, capture_output=True)
            made.append(step.path / "certs")
    yield made
    for directory in made:
        shutil.rmtree(directory)


def names_of_tests(step_dir):
    """Every test of a step's tests/test_*.py files, as "file::name" (methods as Class.name)."""
    names = set()
    for path in sorted(step_dir.glob("tests/test_*.py")):
        names |= {f"{path.name}::{name}" for name in names_in_file(path)}
    return names


def names_in_file(path):
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef) and node.name.startswith(
            "test"
        ):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            for item in node.body:
                if isinstance(
                    item, ast.AsyncFunctionDef | ast.FunctionDef
                ) and item.name.startswith("test"):
                    names.add(f"{node.name}.{item.name}")
    return names


def test_every_test_of_the_previous_step_is_carried_forward(pair):
    """Same name, in a file of the same name: a step adapts tests, never drops them."""
    before, after = pair
    missing = names_of_tests(before.path) - names_of_tests(after.path)
    assert not missing, f"{after.name} dropped tests of {before.name}: {sorted(missing)}"


def test_readme_lists_exactly_the_files_that_changed(step, steps, learner_certificates):
    """The README's "What changed" list equals the real diff (generated code left out); for
    step 01, every file is new."""
    previous = [s for s in steps if s.number == step.number - 1]
    if previous:
        real = changed_files(previous[0].path, step.path)
    else:
        real = {name: "added" for name in changed_files(step.path / "__nothing__", step.path)}
    assert what_changed(step.path / "README.md") == real


def test_make_diff_never_shows_files_git_ignores(pair, learner_certificates):
    """A learner's certs/ (private keys) is never part of `make diff`."""
    assert learner_certificates or pair[1].number < 6, "gen_certs.sh made nothing"
    result = subprocess.run(
        [sys.executable, "tools/ladder.py", "diff", pair[1].label],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "PRIVATE KEY" not in result.stdout
    assert "/certs/" not in "".join(
        line for line in result.stdout.splitlines(keepends=True) if line.startswith(("---", "+++"))
    )
