"""Every ``python -m rd ...`` command the README and docs/ show still parses (issue 13 item 13).

Commands in fenced code blocks are parsed whole by the command line's own parser (nothing is
run); a command quoted inline in prose is often partial, so there the sub-command and every
``--flag`` it names must exist.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from rd.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```[a-z]*\n(.*?)```", re.S)
INLINE = re.compile(r"`([^`\n]*-m rd\b[^`\n]*)`")


def _commands(text: str) -> list[str]:
    """The shell commands of a code block: continuation lines joined, split at ; && and |."""
    joined = text.replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        line = re.sub(r"\$\([^)]*\)", "SUBSTITUTED", line)  # $(python -m rd builtin)
        for part in re.split(r";|&&|\|\|?", line):
            if re.search(r"-m rd\b", part):
                commands.append(part.strip())
    return commands


def _rd_arguments(command: str) -> list[str]:
    words = shlex.split(command, comments=True)
    index = next(i for i in range(len(words) - 1) if words[i] == "-m" and words[i + 1] == "rd")
    return words[index + 2:]


def _cases() -> list[tuple[str, str, bool]]:
    cases = []
    for document in DOCUMENTS:
        text = document.read_text()
        name = document.relative_to(ROOT).as_posix()
        for block in FENCE.findall(text):
            cases += [(name, command, True) for command in _commands(block)]
        prose = FENCE.sub("", text)
        cases += [(name, span, False) for span in INLINE.findall(prose)]
    return cases


CASES = _cases()


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _check_flags(arguments: list[str]) -> None:
    """The sub-command (and sub-sub-command) exist and every --flag is one of theirs."""
    parser = build_parser()
    words = [w.strip("[]") for w in arguments]
    while (choices := _subparsers(parser)) and words and not words[0].startswith("-"):
        assert words[0] in choices, f"no command {words[0]!r}; commands: {sorted(choices)}"
        parser = choices[words.pop(0)]
    known = set(parser._option_string_actions)
    for word in words:
        flag = word.split("=", 1)[0]
        if flag.startswith("--"):
            assert flag in known, f"no option {flag}; options: {sorted(known)}"


def test_the_documents_show_commands():
    assert sum(whole for _, _, whole in CASES) >= 20  # the extraction found the code blocks


@pytest.mark.parametrize("document, command, whole", CASES,
                         ids=[f"{d}:{c[:60]}" for d, c, _ in CASES])
def test_documented_command_parses(document, command, whole):
    arguments = _rd_arguments(command)
    if not whole:
        _check_flags(arguments)
        return
    try:
        build_parser().parse_args(arguments)
    except SystemExit as error:
        pytest.fail(f"{document}: `{command}` does not parse (exit {error.code})")
