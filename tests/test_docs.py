"""The READMEs tell the truth: their commands work as written and print what they show."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.support.readme import console_commands, section
from tools.ladder import step_files
from tools.layout import render, with_layout
from tools.processes import StepServices, demo_environment, run_script
from tools.steps import ROOT, STEP_NAMES, all_steps

ROOT_README = ROOT / "README.md"
# Where the steps' code names an environment variable: a settings declaration
# (`option(default, "NAME", ...)`), a constant, or a direct read.
ENV_NAMED = re.compile(
    r"""(?:\boption\(\s*[^,]+,\s*|\bsecret\(\s*|_VARIABLE\s*=\s*|\b(?:os\.environ\.get|os\.getenv|environ\.get|setdefault)\(\s*)["']([A-Z][A-Z0-9_]+)["']"""
)
# Options shared by several services (step 10 on) name their variable after the service:
# "{SERVICE}_PORT" in a settings class whose SERVICE is "GREETER" or "LOGGER".
ENV_TEMPLATE = re.compile(r"""["']\{SERVICE\}(_[A-Z0-9_]+)["']""")
SERVICE_PREFIX = re.compile(r"""^\s+SERVICE: ClassVar\[str\] = ["']([A-Z]+)["']""", re.MULTILINE)


def environment_variables(code: str) -> set[str]:
    """The environment variables a module reads, as its code names them."""
    names = set(ENV_NAMED.findall(code))
    for prefix in SERVICE_PREFIX.findall(code):
        names |= {prefix + suffix for suffix in ENV_TEMPLATE.findall(code)}
    return names


STEP_SECTIONS = [
    "Goal",
    "What changed",
    "Layout",
    "Run it",
    "How it works",
    "Try it yourself",
    "Recap",
    "Next step",
]
SH_BLOCK = re.compile(r"^```sh\n(.*?)^```", re.MULTILINE | re.DOTALL)
# `README, "The chain"`: a heading of the step's own README; `step 10's README, "..."`: of the
# README of the step that introduced it (a module is carried into every later step).
README_REFERENCE = re.compile(r'(?:step (\d\d)\'s )?README,?\s+(?:#\s+)?"([^"\n]+)"')


def test_step_readme_has_every_section(step):
    readme = step.path / "README.md"
    assert readme.read_text().startswith(f"# Step {step.label} · ")
    missing = [title for title in STEP_SECTIONS if not section(readme, title).strip()]
    assert not missing, f"{step.name}/README.md lacks sections {missing}"


def test_readme_layout_is_the_generated_one(step, steps):
    """Every file of the step on one line, what it is for and the step that brought it, as
    `python tools/ladder.py layout` writes it (tools/layout.py describes each file once)."""
    readme = (step.path / "README.md").read_text()
    assert with_layout(readme, render(step, steps, step_files)) == readme, (
        "run `python tools/ladder.py layout`"
    )


def test_try_it_yourself_has_a_hint(step):
    assert "*Hint:*" in section(step.path / "README.md", "Try it yourself")


def headings(readme: Path) -> set[str]:
    return {
        line.lstrip("#").strip() for line in readme.read_text().splitlines() if line.startswith("#")
    }


def test_readme_references_in_the_code_point_to_sections_that_exist(step):
    """`(README, "The chain")` in a comment names a heading of this step's README, and
    `(step 10's README, "...")` one of step 10's."""
    readmes = {s.label: s.path / "README.md" for s in all_steps()}
    missing = [
        f"{path.name}: {label or 'its own'} README, {title}"
        for path in [*step.path.glob("*.py"), *step.path.glob("tests/*.py")]
        for label, title in README_REFERENCE.findall(path.read_text())
        if title not in headings(readmes[label] if label else step.path / "README.md")
    ]
    assert not missing


def test_module_docstrings_describe_the_module_not_the_step(step):
    """A module is copied into every later step: "this step" in its docstring goes stale."""
    stale = [
        path.name
        for path in step.path.glob("*.py")
        if "this step" in (ast.get_docstring(ast.parse(path.read_text())) or "").lower()
    ]
    assert not stale


def test_run_it_commands_print_what_the_readme_shows(step, tmp_path):
    """Each `$ python client.py ...` of "Run it", run as written against `python server.py`
    (both pointed at a free port through the environment, with the set-up the README asks
    for), prints the output shown."""
    commands = console_commands(step.path / "README.md")
    clients = [c for c in commands if c.argv[:2] == ["python", "client.py"]]
    assert clients, "the README shows no client command"
    assert ["python", "server.py"] in [c.argv[:2] for c in commands]
    env = demo_environment(step.path, tmp_path)
    with StepServices(step.path, env=env) as services:  # the Greeter, and its Logger from 10 on
        for command in clients:
            client_env = {**env, "GREETER_TARGET": services["greeter"].address}
            result = run_script(step.path, "client.py", *command.argv[2:], env=client_env)
            assert result.stdout + result.stderr == command.expected_output, command.argv


def test_root_readme_lists_every_step_folder_built_or_coming():
    table = section(ROOT_README, "The steps")
    missing = [name for name in STEP_NAMES if f"`{name}`" not in table]
    assert not missing


def test_root_readme_documents_every_environment_variable(steps):
    table = section(ROOT_README, "Environment variables")
    read = set()
    for step in steps:
        for path in step.path.glob("*.py"):
            read |= environment_variables(path.read_text())
    assert read, "found no environment variables in the steps' code"
    undocumented = sorted(name for name in read if f"`{name}`" not in table)
    assert not undocumented


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test\n" in ci and "export CI=true" in ci
    assert "make test" in section(ROOT_README, "The two commands")


def test_the_token_commands_of_the_readmes_make_a_usable_token(steps, tmp_path):
    """The READMEs write the token to a file once and read it in each terminal. Those lines,
    run as written by bash with the virtual env first on PATH (as after `source
    .venv/bin/activate`), give a token a client can send and the server accepts."""
    scripts = {
        "\n".join(lines)
        for step in steps
        if (
            lines := [
                line
                for block in SH_BLOCK.findall((step.path / "README.md").read_text())
                for line in block.splitlines()
                if "greeter.token" in line
            ]
        )
    }
    assert scripts, "no README shows how to make a token"
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    for script in scripts:
        result = subprocess.run(
            ["bash", "-ec", f'{script}\nprintf %s "$GREETER_AUTH_TOKEN"'],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env={**os.environ, "PATH": path},
            check=True,
        )
        token = result.stdout
        assert len(token) >= 16 and all("!" <= c <= "~" for c in token), script
