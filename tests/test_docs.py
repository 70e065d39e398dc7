"""The READMEs tell the truth: their commands work as written and print what they show."""

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.support.readme import console_commands, section
from tools.processes import ServerProcess, demo_environment, run_script
from tools.steps import ROOT

ROOT_README = ROOT / "README.md"
ENV_READ = re.compile(
    r"""\b(?:env|os\.environ\.get|os\.getenv|environ\.get)\(\s*["']([A-Z][A-Z0-9_]+)["']"""
)
STEP_SECTIONS = ["Goal", "What changed", "Run it", "How it works", "Try it yourself", "Next step"]


def test_step_readme_has_every_section(step):
    readme = step.path / "README.md"
    assert readme.read_text().startswith(f"# Step {step.label} · ")
    missing = [title for title in STEP_SECTIONS if not section(readme, title).strip()]
    assert not missing, f"{step.name}/README.md lacks sections {missing}"


def test_run_it_commands_print_what_the_readme_shows(step, tmp_path):
    """Each `$ python client.py ...` of "Run it", run as written against `python server.py`
    (both pointed at a free port through the environment, with the set-up the README asks
    for), prints the output shown."""
    commands = console_commands(step.path / "README.md")
    clients = [c for c in commands if c.argv[:2] == ["python", "client.py"]]
    assert clients, "the README shows no client command"
    assert ["python", "server.py"] in [c.argv[:2] for c in commands]
    env = demo_environment(step.path, tmp_path)
    with ServerProcess(step.path, env=env) as server:
        for command in clients:
            client_env = {**env, "GREETER_TARGET": server.address}
            result = run_script(step.path, "client.py", *command.argv[2:], env=client_env)
            assert result.stdout + result.stderr == command.expected_output, command.argv


def test_root_readme_lists_every_step_folder(steps):
    text = ROOT_README.read_text()
    for step in steps:
        assert f"`{step.name}`" in text


def test_root_readme_documents_every_environment_variable(steps):
    table = section(ROOT_README, "Environment variables")
    read = set()
    for step in steps:
        for path in step.path.glob("*.py"):
            read |= set(ENV_READ.findall(path.read_text()))
    assert read, "found no environment variables in the steps' code"
    undocumented = sorted(name for name in read if f"`{name}`" not in table)
    assert not undocumented


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test\n" in ci and "export CI=true" in ci
    assert "make test" in section(ROOT_README, "The two commands")


def test_the_token_command_of_the_readmes_makes_a_usable_token(steps):
    """`export GREETER_AUTH_TOKEN=$(python -c ...)`, as the READMEs show it, in a shell with
    the virtual env first on PATH (as after `source .venv/bin/activate`)."""
    lines = {
        line.strip()
        for step in steps
        for line in (step.path / "README.md").read_text().splitlines()
        if line.startswith("export GREETER_AUTH_TOKEN=")
    }
    assert lines, "no README shows how to make a token"
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    for line in lines:
        result = subprocess.run(
            ["bash", "-c", f'{line} && printf %s "$GREETER_AUTH_TOKEN"'],
            capture_output=True,
            text=True,
            env={**os.environ, "PATH": path},
            check=True,
        )
        assert len(result.stdout) >= 16 and result.stdout.isprintable(), line
