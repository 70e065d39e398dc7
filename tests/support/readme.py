"""Read the parts of a step README that the repo tests check."""

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

# `path` (new): one file per bullet, or several in one bullet (the tests: `a.py` (new), ...).
WHAT_CHANGED_ITEM = re.compile(r"`([^`]+)` \((new|changed|removed)\)")
KIND = {"new": "added", "changed": "modified", "removed": "removed"}
CONSOLE_BLOCK = re.compile(r"^```console\n(.*?)^```", re.MULTILINE | re.DOTALL)


def section(readme: Path, title: str) -> str:
    """The text under `## title`, up to the next `## ` heading ("" when absent)."""
    text = readme.read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    return match.group(1) if match else ""


def what_changed(readme: Path) -> dict[str, str]:
    """{file: "added" | "modified" | "removed"} as the README's "What changed" lists them."""
    return {
        path: KIND[kind]
        for path, kind in WHAT_CHANGED_ITEM.findall(section(readme, "What changed"))
    }


@dataclass(frozen=True)
class ConsoleCommand:
    line: str  # the command as written, for a shell
    argv: list[str]
    expected_output: str  # the lines the README shows under the command, "\n"-terminated


def console_commands(readme: Path, title: str = "Run it") -> list[ConsoleCommand]:
    """Every `$ command` of the ```console blocks in a section, with the output shown for it."""
    commands = []
    for block in CONSOLE_BLOCK.findall(section(readme, title)):
        for chunk in re.split(r"^\$ ", block, flags=re.MULTILINE)[1:]:
            command, _, output = chunk.partition("\n")
            commands.append(ConsoleCommand(command, shlex.split(command), output))
    return commands
