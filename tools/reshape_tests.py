"""One-off reshape (issue 6): split each step's test_greeter.py into one test file per
feature, moving the helpers that several files use into the step's conftest.py.

    python tools/reshape_tests.py          (then: ruff check --fix . && ruff format .)

Every step gets exactly the same treatment: a section `# --- Title ---` of test_greeter.py
becomes the file FILES[Title]; a helper used by more than one file (or by the preamble) moves
to conftest.py; imports are merged and ruff removes the unused ones.
"""

import ast
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.steps import all_steps

FILES = {
    "SayHello": (
        "test_unary.py",
        "SayHello, the unary RPC: its reply, its input validation and its message limits.",
    ),
    "StreamGreetings": (
        "test_stream.py",
        "StreamGreetings, the server stream: count, order, pacing, validation and cancellation.",
    ),
    "Chat": (
        "test_chat.py",
        "Chat, the bidirectional stream: ping-pong replies, half-close, limits and disconnects.",
    ),
    "One log line per RPC (interceptors)": (
        "test_rpc_log.py",
        "One log line per RPC, on the server and on the client, for every RPC kind and outcome.",
    ),
    "Metadata auth": (
        "test_auth.py",
        "Metadata auth: a bearer token and a user id, checked for every RPC kind.",
    ),
    "TLS and mutual TLS": (
        "test_tls.py",
        "TLS only, mutual TLS on request: encryption, certificate checks, the calling service.",
    ),
    "Health and reflection": (
        "test_health.py",
        "The standard health service and reflection: probes, the shutdown order, grpcurl.",
    ),
    "Graceful shutdown": (
        "test_shutdown.py",
        "Graceful shutdown: in-flight calls finish, new ones are refused, signals stop the "
        "process cleanly.",
    ),
    "The command-line client": (
        "test_cli.py",
        "The command-line client, run as a learner runs it: replies, and errors in one line.",
    ),
}
SECTION = re.compile(r"^# --- (.+?) -+$")


def statement_ranges(tree: ast.Module, lines: list[str]):
    """(first line, last line) of each top-level statement, decorators and the comment lines
    right above it included (0-based, inclusive)."""
    for node in tree.body:
        first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))]) - 1
        while (
            first > 0 and lines[first - 1].startswith("#") and not SECTION.match(lines[first - 1])
        ):
            first -= 1
        yield node, first, node.end_lineno - 1


def defined(node) -> set[str]:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return {node.name}
    if isinstance(node, ast.Assign | ast.AnnAssign):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return set()


def used(node) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def render_imports(nodes: list[ast.stmt], skip_module: str | None = None) -> str:
    plain, froms = set(), {}
    for node in nodes:
        if isinstance(node, ast.Import):
            plain |= {a.name if a.asname is None else f"{a.name} as {a.asname}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module != skip_module:
            names = froms.setdefault(node.module, set())
            names |= {a.name if a.asname is None else f"{a.name} as {a.asname}" for a in node.names}
    out = [f"import {name}" for name in sorted(plain)]
    out += [f"from {m} import {', '.join(sorted(n))}" for m, n in sorted(froms.items())]
    return "\n".join(out) + "\n"


def reshape(step_dir: Path) -> None:
    source = (step_dir / "test_greeter.py").read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    imports = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    section_at = {}
    current = None
    for number, line in enumerate(lines):
        if match := SECTION.match(line):
            current = match.group(1)
        section_at[number] = current

    items = []  # (node, text, section or None for the preamble)
    for node, first, last in statement_ranges(tree, lines):
        if isinstance(node, ast.Import | ast.ImportFrom):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the module docstring
        text = "\n".join(lines[first : last + 1])
        items.append((node, text, section_at[first]))

    def file_of(section):
        return None if section is None else FILES[section][0]

    helpers = {}  # name -> item index
    for index, (node, _, _) in enumerate(items):
        for name in defined(node):
            if not name.startswith("test_"):
                helpers[name] = index
    users = {name: set() for name in helpers}
    for node, _, section in items:
        for name in used(node) & helpers.keys():
            if helpers[name] != items.index(next(i for i in items if i[0] is node)):
                users[name].add(file_of(section))
    shared = {
        helpers[name]
        for name in helpers
        if items[helpers[name]][2] is None
        or len(users[name] | {file_of(items[helpers[name]][2])}) > 1
    }
    # What a shared helper uses must be shared too.
    changed = True
    while changed:
        changed = False
        for index in list(shared):
            for name in used(items[index][0]) & helpers.keys():
                if helpers[name] not in shared:
                    shared.add(helpers[name])
                    changed = True
    shared_names = sorted({n for i in shared for n in defined(items[i][0])})

    conftest_path = step_dir / "conftest.py"
    conftest = conftest_path.read_text()
    conftest_tree = ast.parse(conftest)
    conftest_names = sorted(
        {n for node in conftest_tree.body for n in defined(node)} | set(shared_names)
    )
    conftest_imports = [n for n in conftest_tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    conftest_lines = conftest.splitlines()
    body_start = max(n.end_lineno for n in conftest_imports)
    docstring = ast.get_docstring(conftest_tree)
    new_conftest = (
        '"""Fixtures and helpers shared by this step\'s test files: servers (in-process and\n'
        'real processes), channels, and small helpers for calls and log lines."""\n\n'
        + render_imports(conftest_imports + imports, skip_module="conftest")
        + "\n".join(conftest_lines[body_start:]).rstrip()
        + "\n\n\n"
        + "\n\n\n".join(items[i][1] for i in sorted(shared))
        + "\n"
    )
    assert docstring
    conftest_path.write_text(new_conftest)

    by_file: dict[str, list[str]] = {}
    for index, (_, text, section) in enumerate(items):
        if index in shared:
            continue
        by_file.setdefault(file_of(section), []).append(text)
    from_conftest = ast.parse(f"from conftest import {', '.join(conftest_names)}").body
    for name, doc in FILES.values():
        if name not in by_file:
            continue
        text = (
            f'"""{doc}"""\n\n'
            + render_imports(imports + from_conftest)
            + "\n\n"
            + "\n\n\n".join(by_file[name])
            + "\n"
        )
        (step_dir / name).write_text(text)
    (step_dir / "test_greeter.py").unlink()
    print(f"{step_dir.name}: {sorted(by_file)} + conftest {shared_names}")


if __name__ == "__main__":
    for step in all_steps():
        reshape(step.path)
