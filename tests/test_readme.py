"""The README's commands cannot drift from the CLI: each `prune-cli` line of its shell blocks names a real command
and real options, and a recipe command's recipe and overrides validate. (Running them end to end is the job of the
pipeline tests: the demo recipe, own-data runs and `eval --manifest` are exercised there on tiny data.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from conftest import cli

README = Path(__file__).resolve().parent.parent / "README.md"
GROUPS = {"data", "model", "recipe"}  # commands with subcommands
RECIPE_COMMANDS = {"run", "train", "prune", "eval", "profile"}


def readme_commands() -> list[list[str]]:
    out = []
    for block in re.findall(r"```sh\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("prune-cli "):
                out.append(shlex.split(re.split(r"\s+#\s", line)[0]))
    return out


COMMANDS = readme_commands()


def test_the_readme_shows_the_main_commands() -> None:
    assert {tuple(c[1:3]) if c[1] in GROUPS else (c[1],) for c in COMMANDS} >= {("run",), ("eval",), ("data", "check")}


@pytest.mark.parametrize("cmd", COMMANDS, ids=[" ".join(c[1:4]) for c in COMMANDS])
def test_a_readme_command_names_a_real_command_real_options_and_a_valid_recipe(cmd: list[str]) -> None:
    sub = cmd[1:3] if cmd[1] in GROUPS else cmd[1:2]
    r = cli(*sub, "--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    for opt in (t for t in cmd if t.startswith("--")):
        assert opt in text, f"{' '.join(cmd)}: {opt} is not an option of prune-cli {' '.join(sub)}"
    if cmd[1] in RECIPE_COMMANDS:
        overrides = [t for t in cmd[3:] if "=" in t and not t.startswith("-")]
        r = cli("recipe", "validate", cmd[2], *overrides)
        assert r.returncode == 0, r.stderr
