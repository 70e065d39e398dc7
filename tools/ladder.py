"""The ladder tool: every step is the step before it plus one feature.

    python tools/ladder.py diff NN          what step NN adds to step NN-1 (make diff STEP=NN)
    python tools/ladder.py diff AA BB       what changes from step AA to step BB
    python tools/ladder.py stats            files and code lines changed for every adjacent pair
    python tools/ladder.py propagate NN     carry the change made to step NN into NN+1 .. last
    python tools/ladder.py layout           write the Layout section of every step README

Generated code (*_pb2.py, *_pb2_grpc.py, *_pb2.pyi, *_pb2_grpc.pyi) is left out of diffs and statistics.

propagate takes the change to step NN from git: its uncommitted changes if it has any,
otherwise its change in the last commit. Each later step gets that change by a 3-way merge
(git merge-file: base = step NN before, theirs = step NN after, ours = the later step). It
stops at the first conflict, leaving that step untouched, and says how to go on. README.md is
never carried (each step's README describes its own step). Steps whose proto changed get
their code regenerated.
"""

import argparse
import difflib
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import itertools

from tools.codegen import generate, is_generated
from tools.layout import render, with_layout
from tools.steps import ROOT, Step, all_steps, find_step

IGNORED_PARTS = {"__pycache__", ".pytest_cache", ".ruff_cache"}
NOT_CARRIED = {"README.md"}
EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"  # git's id of the empty tree


def is_ladder_file(relative: Path) -> bool:
    """A file that belongs to the step's source: not generated, not a cache."""
    return not is_generated(relative) and not IGNORED_PARTS & set(relative.parts)


def ignored_by_git(directory: Path, names: list[str]) -> set[str]:
    """The `names` (relative to `directory`) that git ignores: certificates a learner made
    with gen_certs.sh, caches. None outside a git work tree."""
    if not names:
        return set()
    result = subprocess.run(
        ["git", "check-ignore", "--no-index", "-z", "--stdin"],
        cwd=directory,
        input="\0".join(names),
        capture_output=True,
        text=True,
    )
    return set(result.stdout.split("\0")) - {""} if result.returncode == 0 else set()


def step_files(step_dir: Path) -> dict[str, Path]:
    """The step's own files: not generated, not caches, nothing git ignores."""
    files = {}
    for path in step_dir.rglob("*"):
        relative = path.relative_to(step_dir)
        if path.is_file() and is_ladder_file(relative):
            files[relative.as_posix()] = path
    for name in ignored_by_git(step_dir, list(files)):
        del files[name]
    return files


def changed_files(before: Path, after: Path) -> dict[str, str]:
    """{relative path: "added" | "modified" | "removed"} from step folder `before` to `after`."""
    old, new = step_files(before), step_files(after)
    changes = {}
    for name in sorted(old.keys() | new.keys()):
        if name not in old:
            changes[name] = "added"
        elif name not in new:
            changes[name] = "removed"
        elif old[name].read_bytes() != new[name].read_bytes():
            changes[name] = "modified"
    return changes


def read_lines(path: Path | None) -> list[str]:
    return path.read_text().splitlines(keepends=True) if path and path.exists() else []


def unified_diff(before: Step, after: Step) -> str:
    old, new = step_files(before.path), step_files(after.path)
    chunks = []
    for name in changed_files(before.path, after.path):
        chunks.extend(
            difflib.unified_diff(
                read_lines(old.get(name)),
                read_lines(new.get(name)),
                f"{before.name}/{name}",
                f"{after.name}/{name}",
            )
        )
    return "".join(chunks)


def counted(lines: list[str]) -> int:
    return sum(1 for line in lines if line.strip())


def pair_stats(before: Step, after: Step) -> dict[str, int]:
    """Changed files by kind, and non-blank lines added/removed in code (.py, .proto) and in
    the rest (READMEs, configs)."""
    stats = {
        "added": 0,
        "modified": 0,
        "removed": 0,
        "code+": 0,
        "code-": 0,
        "other+": 0,
        "other-": 0,
    }
    old, new = step_files(before.path), step_files(after.path)
    for name, kind in changed_files(before.path, after.path).items():
        stats[kind] += 1
        area = "code" if name.endswith((".py", ".proto")) else "other"
        diff = list(difflib.unified_diff(read_lines(old.get(name)), read_lines(new.get(name)), n=0))
        body = [line for line in diff if not line.startswith(("---", "+++", "@@"))]
        stats[f"{area}+"] += counted([line[1:] for line in body if line.startswith("+")])
        stats[f"{area}-"] += counted([line[1:] for line in body if line.startswith("-")])
    return stats


# --- propagate ----------------------------------------------------------------------------


def git(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=check)


def change_to_carry(
    root: Path, step: Step
) -> tuple[str, dict[str, str | None], dict[str, str | None]]:
    """(where the change comes from, {file: content before}, {file: content after}) for the
    change to `step`: uncommitted if any, else the last commit. None means "no such file"."""
    folder = step.name
    uncommitted = git(root, "status", "--porcelain", "--untracked-files=all", "--", folder).stdout
    if uncommitted.strip():
        source, base_rev, new_rev = "uncommitted changes", "HEAD", None
    else:
        has_parent = (
            git(root, "rev-parse", "--verify", "--quiet", "HEAD~1", check=False).returncode == 0
        )
        source, base_rev, new_rev = (
            "the last commit",
            "HEAD~1" if has_parent else EMPTY_TREE,
            "HEAD",
        )
    names = set(
        git(
            root, "diff", "--name-only", base_rev, *([new_rev] if new_rev else []), "--", folder
        ).stdout.split()
    )
    if new_rev is None:
        names |= set(
            git(root, "ls-files", "--others", "--exclude-standard", "--", folder).stdout.split()
        )

    def content(rev: str | None, name: str) -> str | None:
        if rev is None:
            path = root / name
            return path.read_text() if path.exists() else None
        shown = git(root, "show", f"{rev}:{name}", check=False)
        return shown.stdout if shown.returncode == 0 else None

    before, after = {}, {}
    for name in sorted(names):
        relative = Path(name).relative_to(folder)
        if not is_ladder_file(relative) or relative.name in NOT_CARRIED:
            continue
        before[relative.as_posix()] = content(base_rev, name)
        after[relative.as_posix()] = content(new_rev, name)
    return source, before, after


def merge(ours: str | None, base: str | None, theirs: str | None) -> str | Exception | None:
    """3-way merge of one file; an Exception (not raised) describes a conflict."""
    if ours == theirs:
        return ours
    if base is None or theirs is None or ours is None:
        if ours == base:
            return theirs  # file added or removed in step NN, untouched here: follow it
        return ValueError("added or removed in the source step but differs here")
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for label, text in (("ours", ours), ("base", base), ("theirs", theirs)):
            path = Path(tmp) / label
            path.write_text(text)
            paths.append(str(path))
        result = subprocess.run(["git", "merge-file", "-p", *paths], capture_output=True, text=True)
    if result.returncode != 0:
        return ValueError(f"{result.returncode} conflicting hunk(s)")
    return result.stdout


def propagate(root: Path, selector: str) -> int:
    source_step = find_step(selector, root)
    source, before, after = change_to_carry(root, source_step)
    if not before:
        print(
            f"nothing to carry: no change to {source_step.name} in {source} (README.md is never carried)"
        )
        return 1
    print(f"carrying {source} of {source_step.name}: {', '.join(before)}")
    for step in [s for s in all_steps(root) if s.number > source_step.number]:
        merged: dict[str, str | None] = {}
        for name in before:
            path = step.path / name
            ours = path.read_text() if path.exists() else None
            result = merge(ours, before[name], after[name])
            if isinstance(result, Exception):
                print(
                    f"CONFLICT in {step.name}/{name}: {result}.\n"
                    f"{step.name} was left untouched; steps before it have the change.\n"
                    f"Apply the change to {step.name} by hand, then run\n"
                    f"    python tools/ladder.py propagate {step.label}\n"
                    f"to carry it on from there."
                )
                return 1
            merged[name] = result
        for name, text in merged.items():
            path = step.path / name
            if text is None:
                path.unlink(missing_ok=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
        if any(name.endswith(".proto") for name in merged):
            generate(step.path, step.path)
        print(f"  {step.name}: merged")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)
    diff = commands.add_parser("diff", help="diff two steps without generated code")
    diff.add_argument("steps", nargs="+", metavar="NN")
    commands.add_parser("stats", help="change statistics for every adjacent pair of steps")
    carry = commands.add_parser("propagate", help="carry step NN's change into every later step")
    carry.add_argument("step", metavar="NN")
    commands.add_parser("layout", help="write the Layout section of every step README")
    args = parser.parse_args(argv)

    if args.command == "diff":
        if len(args.steps) > 2:
            parser.error("diff takes one step (diffed against the one before) or two")
        after = find_step(args.steps[-1], args.root)
        if len(args.steps) == 2:
            before = find_step(args.steps[0], args.root)
        elif after.number == 1:
            parser.error(
                f"{after.name} is the first step: there is nothing before it to diff against"
            )
        else:
            before = find_step(str(after.number - 1), args.root)
        sys.stdout.write(unified_diff(before, after))
        return 0
    if args.command == "stats":
        steps = all_steps(args.root)
        print(f"{'steps':<8} {'files +/~/-':>12} {'code lines +/-':>15} {'other lines +/-':>16}")
        for before, after in itertools.pairwise(steps):
            s = pair_stats(before, after)
            files = f"{s['added']}/{s['modified']}/{s['removed']}"
            code = f"+{s['code+']} -{s['code-']}"
            other = f"+{s['other+']} -{s['other-']}"
            print(f"{before.label}→{after.label:<4} {files:>12} {code:>15} {other:>16}")
        return 0
    if args.command == "layout":
        return write_layouts(args.root)
    return propagate(args.root, args.step)


def write_layouts(root: Path) -> int:
    steps = all_steps(root)
    for step in steps:
        readme = step.path / "README.md"
        text = readme.read_text()
        new = with_layout(text, render(step, steps, step_files))
        if new != text:
            readme.write_text(new)
            print(f"  {step.name}: Layout written")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
