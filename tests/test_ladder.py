"""The ladder: step N is step N-1 plus one feature, and says so."""

import ast

from tests.support.readme import what_changed
from tools.ladder import changed_files


def names_of_tests(path):
    """Every test function name in a step's test_greeter.py (methods as Class.name)."""
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
    before, after = pair
    missing = names_of_tests(before.path / "test_greeter.py") - names_of_tests(
        after.path / "test_greeter.py"
    )
    assert not missing, f"{after.name} dropped tests of {before.name}: {sorted(missing)}"


def test_readme_lists_exactly_the_files_that_changed(step, steps):
    """The README's "What changed" list equals the real diff (generated code left out); for
    step 01, every file is new."""
    previous = [s for s in steps if s.number == step.number - 1]
    if previous:
        real = changed_files(previous[0].path, step.path)
    else:
        real = {name: "added" for name in changed_files(step.path / "__nothing__", step.path)}
    assert what_changed(step.path / "README.md") == real
