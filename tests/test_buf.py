"""buf over the steps' protos (https://buf.build/docs/breaking/): no step breaks the API of
the step before it, so a client built at any step keeps working at every later one; and
from step 17 on, where the step has a buf.yaml, `buf lint` passes and `buf breaking` catches
a breaking edit of greeter.v1 (which is why v2 is a new package)."""

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools.codegen import GOOGLEAPIS_PROTOS
from tools.steps import all_steps

BUF = str(Path(sys.executable).with_name("buf"))  # PyPI buf-bin, in requirements.lock
STEPS = all_steps()
ADJACENT = list(itertools.pairwise(STEPS))
LINTED = [s for s in STEPS if (s.path / "buf.yaml").exists()]
BREAKING = 100  # buf's exit code when it finds a breaking change or a lint failure


def buf(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BUF, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def test_buf_yaml_arrives_with_step_17():
    assert [s.label for s in LINTED] == [s.label for s in STEPS if s.number >= 17]


# Breaking changes made on purpose, each the safe way: step 11 moved the Logger's user id
# from the request into metadata and reserved the field's number and name, so an old
# client's user_id is ignored on the wire, never misread (step 11's README). Generated code
# that set it no longer compiles, which is what buf's FILE rules report.
KNOWN_BREAKS = {
    (10, 11): [
        'protos/logger/v1/logger.proto:18:1:Previously present field "2" with name "user_id" '
        'on message "Greeting" was deleted.'
    ]
}


def wire_only(step) -> str:
    """buf's config for only what breaks clients on the wire (or in JSON): reserved numbers
    and names are safe. With the step's vendored imports (third_party/) as a module."""
    modules = [{"path": "protos"}]
    if (step.path / "third_party").exists():
        modules.append({"path": "third_party"})
    return json.dumps({"version": "v2", "modules": modules, "breaking": {"use": ["WIRE_JSON"]}})


@pytest.mark.parametrize(
    ("earlier", "later"), ADJACENT, ids=[f"{a.label}-{b.label}" for a, b in ADJACENT]
)
def test_no_step_breaks_the_protos_of_the_step_before(earlier, later):
    # A step with a buf.yaml is a workspace: its protos' imports (step 19's google/api, in
    # third_party/) resolve only in it.
    against = str(earlier.path if (earlier.path / "buf.yaml").exists() else earlier.path / "protos")
    # buf compares module by module: the whole workspace where both vendor their imports (one
    # module each for protos/ and third_party/), protos/ alone where the earlier has none.
    vendored = all((step.path / "third_party").exists() for step in (earlier, later))
    source = "." if vendored else "protos"
    result = buf("breaking", source, "--against", against, cwd=later.path)
    known = KNOWN_BREAKS.get((earlier.number, later.number), [])
    assert result.stdout.splitlines() == known, result.stdout + result.stderr
    wire = buf(
        "breaking", source, "--against", against, "--config", wire_only(later), cwd=later.path
    )
    assert wire.returncode == 0, wire.stdout + wire.stderr


@pytest.mark.parametrize("versioned", LINTED, ids=[s.label for s in LINTED])
def test_buf_lint_passes(versioned):
    result = buf("lint", cwd=versioned.path)
    assert result.returncode == 0, result.stdout + result.stderr


VENDORED = [s for s in STEPS if (s.path / "third_party").exists()]


@pytest.mark.parametrize("vendoring", VENDORED, ids=[s.label for s in VENDORED])
def test_vendored_protos_are_the_installed_googleapis_ones(vendoring):
    """third_party/ holds what buf cannot fetch here (google/api/*.proto, step 19 on):
    byte for byte the files googleapis-common-protos installs, which protoc and the
    Python code use. (Step 21's buf/validate has a test of its own, in the step.)"""
    vendored = sorted((vendoring.path / "third_party" / "google").rglob("*.proto"))
    assert vendored, "third_party/ has no proto"
    for path in vendored:
        relative = path.relative_to(vendoring.path / "third_party")
        assert path.read_bytes() == (GOOGLEAPIS_PROTOS / relative).read_bytes(), relative


@pytest.fixture
def scratch(tmp_path) -> Path:
    """A scratch copy of the newest step's protos and buf.yaml (and what they import), to
    edit."""
    newest = LINTED[-1].path
    shutil.copytree(newest / "protos", tmp_path / "protos")
    if (newest / "third_party").exists():
        shutil.copytree(newest / "third_party", tmp_path / "third_party")
    shutil.copy(newest / "buf.yaml", tmp_path)
    return tmp_path


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} is not in {path}"
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(
    ("old", "new", "caught"),
    [
        # HelloReply's field: HelloRequest's carry validation rules from step 21 on.
        (
            "string message = 1;",
            "bytes message = 1;",
            'Field "1" with name "message" on message "HelloReply" changed type from "string" to "bytes".',
        ),
        (
            "string message = 1;",
            "",
            'Previously present field "1" with name "message" on message "HelloReply" was deleted.',
        ),
        (
            "string message = 1;",
            "string text = 1;",
            'Field "1" on message "HelloReply" changed name from "message" to "text".',
        ),
        (
            "  rpc Chat(stream HelloRequest) returns (stream HelloReply);",
            "",
            'Previously present RPC "Chat" on service "Greeter" was deleted.',
        ),
    ],
    ids=["type", "deleted-field", "renamed-field", "deleted-rpc"],
)
def test_buf_breaking_catches_a_breaking_edit_of_v1(scratch, old, new, caught):
    against = str(LINTED[-1].path)
    assert buf("breaking", "--against", against, cwd=scratch).returncode == 0
    edit(scratch / "protos" / "greeter" / "v1" / "greeter.proto", old, new)
    result = buf("breaking", "--against", against, cwd=scratch)
    assert result.returncode == BREAKING, result.stdout + result.stderr
    assert caught in result.stdout, result.stdout + result.stderr


def test_adding_to_v1_is_not_breaking(scratch):
    """What v1 may still do: add a field (old clients ignore it, new ones see its default)."""
    v1 = scratch / "protos" / "greeter" / "v1" / "greeter.proto"
    edit(v1, "string message = 1;", "string message = 1;\n  string language = 2;")
    result = buf("breaking", "--against", str(LINTED[-1].path), cwd=scratch)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_holds_v2_to_the_standard_rules(scratch):
    """v1's exceptions in buf.yaml are v1's alone: v2 breaking a STANDARD rule fails lint."""
    v2 = scratch / "protos" / "greeter" / "v2" / "greeter.proto"
    assert buf("lint", cwd=scratch).returncode == 0
    edit(v2, "string given_name = 1", "string givenName = 1")  # its rules, if any, follow
    result = buf("lint", cwd=scratch)
    assert result.returncode == BREAKING, result.stdout + result.stderr
    assert 'Field name "givenName" should be lower_snake_case' in result.stdout
