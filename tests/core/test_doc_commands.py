"""Every command that README.md and docs/ show in a code block parses with that command's own parser, without running:
a renamed option, a moved config, a subcommand that does not exist or a config of the wrong command fails here, with
the file and line of the doc.

How a line is read: fenced code blocks, and inline code spans of the prose that are whole commands (an option with
its value, no synopsis); ``\\`` continuations joined; ``#`` comments dropped (shlex); launchers
(``srun``, ``torchrun ... "$(which lightning-methods)"`` or ``-m <command module>``, ``VAR=value`` prefixes,
``cd DIR &&``) skipped; brace
expansion (``cifar100_{a,b}.yaml``) expanded; the docs' placeholders (``DIR``, ``CFG``, ``CKPT``, ``<setup>``,
``$REPO``, ...) replaced by values of the right kind; ``configs/...`` resolved in the repository (the test runs in an
empty folder). A synopsis (``[--opt X]`` groups) is read with its optional groups in; a synopsis with alternatives
(``run|commands``) only has its option names checked. ``fit`` / ``validate`` / ``test`` / ``predict`` parse through
LightningCLI with ``--print_config`` (the config is resolved, nothing is instantiated); the package's commands through
their ``build_parser()``, as their ``main`` does (``grid``'s fit arguments after ``--`` through ``fit`` on its first
config, ``hpn-sweep``'s extra arguments likewise).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
from pathlib import Path

import pytest

from lightning_methods import cli

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "docs" / "methods").glob("*.md"))]
#: The docs' placeholders and what stands in for them (``CFG``: a config of the command, see ``_config_for``).
PLACEHOLDERS = {"DIR": "/data/placeholder", "CKPT": "/ckpt/placeholder.ckpt", "TEACHER": "/ckpt/teacher.ckpt",
                "PATH": "/ckpt/placeholder.ckpt", "<setup>": "imagenet_resnet50_samon", "$REPO": str(REPO)}
CONFIG_FOR = {"ood": "configs/ood/digits_demo.yaml", "fed": "configs/federated/digits_demo.yaml",
              "select": "configs/noisy_labels/digits_sym40.yaml"}
PROGRAM = re.compile(r"^lightning-methods(-[a-z-]+)?$")  # the console scripts


def doc_commands() -> list[tuple[str, str]]:
    """``(file:line, command line)`` of every ``lightning-methods`` command in a fenced code block of the docs, and of
    every whole one in an inline code span of the prose (:func:`_inline_commands`)."""
    found = []
    for doc in DOCS:
        lines, in_block, pending, start = doc.read_text(encoding="utf-8").splitlines(), False, "", 0
        for number, line in enumerate(lines, 1):
            if line.lstrip().startswith("```"):
                in_block, pending = not in_block, ""
                continue
            if not in_block:
                found += [(f"{doc.relative_to(REPO)}:{number}", span) for span in _inline_commands(line)]
                continue
            if not pending:
                start = number
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            text, pending = pending + line, ""
            if text.lstrip().startswith("["):  # a command's printed output ("[lightning-methods] resume it with: ...")
                continue
            for part in text.split("&&"):
                try:
                    words = shlex.split(part, comments=True)
                except ValueError:  # not shell (e.g. TOML)
                    continue
                if words and _program_index(words) is not None:
                    found.append((f"{doc.relative_to(REPO)}:{start}", part.strip()))
    return found


def _inline_commands(line: str) -> list[str]:
    """The inline code spans of a prose line that are whole commands: a program with at least one option, no synopsis
    (``...``, ``[...]``, ``a|b``) and no option named without its value (``table --baseline``, prose about an
    option)."""
    spans = []
    for span in re.findall(r"`([^`]+)`", line):
        try:
            words = shlex.split(span)
        except ValueError:
            continue
        if (words and _program_index(words) is not None and any(w.startswith("--") for w in words)
                and not re.search(r"\.\.\.|\[|\|", span) and not words[-1].startswith("--")):
            spans.append(span)
    return spans


def _command_of(word: str) -> str | None:
    """The command a program word starts: ``lightning-methods`` -> "" (the next word says), ``lightning-methods-fed``
    or the module ``lightning_methods.federated.cli`` (``torchrun -m``) -> "fed"; None for any other word."""
    name = word.strip('"').removeprefix("$(which ").rstrip(')"')
    if PROGRAM.match(name):
        return name.removeprefix("lightning-methods").removeprefix("-")
    modules = {module: command for command, (module, _) in cli.COMMANDS.items()}
    return "" if name in ("lightning_methods", "lightning_methods.cli") else modules.get(name)


def _program_index(words: list[str]) -> int | None:
    """Where the program is among the first words (after VAR=value, srun, torchrun and its options), or None."""
    for i, word in enumerate(words):
        if _command_of(word) is not None and (i == 0 or not words[i - 1].startswith("--") or words[0] != "torchrun"):
            return i
        if not (re.match(r"^[A-Z_]+=\S*$", word) or word in ("srun", "torchrun") or word.startswith("-")
                or (i and words[i - 1].startswith("--") and words[0] == "torchrun")):
            return None
    return None


def _expand_braces(word: str) -> list[str]:
    match = re.search(r"\{([^{}]*,[^{}]*)\}", word)
    if not match:
        return [word]
    return [w for alt in match.group(1).split(",") for w in _expand_braces(word[: match.start()] + alt
                                                                         + word[match.end():])]


def _argv(line: str) -> tuple[str, list[str], bool]:
    """``(command, arguments, synopsis with alternatives)`` of a documented line, placeholders replaced."""
    synopsis_alternatives = "|" in line or "[-- " in line
    line = re.sub(r"\[(-[^\[\]]*)\]", r"\1", line)  # optional groups of a synopsis: [--ddof 1] -> --ddof 1
    words = shlex.split(line, comments=True)
    words = words[_program_index(words):]
    command, words = _command_of(words[0]), words[1:]
    command = command or words.pop(0)
    args = []
    for word in words:
        if word == "...":  # "and so on" in a synopsis
            continue
        for key, value in PLACEHOLDERS.items():
            word = re.sub(rf"(?<![A-Za-z_]){re.escape(key)}(?![A-Za-z_])", value, word)
        for expanded in _expand_braces(word):
            if expanded in ("CFG", "run.yaml") or expanded.endswith(("A.yaml", "B.yaml")):
                expanded = CONFIG_FOR.get(command, "configs/quickstart.yaml")
            if expanded.startswith("configs/") or "=configs/" in expanded:
                expanded = expanded.replace("configs/", f"{REPO}/configs/", 1)
            args.append(expanded)
    return command, args, synopsis_alternatives


def _parse_lightning(command: str, args: list[str]) -> None:
    extra = [] if {"--help", "-h", "--print_config"} & set(args) else ["--print_config"]
    cli.main([command, *args, *extra])


def _parse_package(command: str, args: list[str], synopsis_alternatives: bool) -> None:
    module = importlib.import_module(cli.COMMANDS[command][0])
    parser = module.build_parser()
    if synopsis_alternatives:
        known = set(parser._option_string_actions)  # noqa: SLF001 - argparse keeps no public list
        unknown = [w.split("=")[0] for w in args if w.startswith("--") and w != "--" and w.split("=")[0] not in known]
        assert not unknown, f"options not of `lightning-methods {command}`: {unknown}"
        return
    if command == "fed" and args[:1] == ["table"]:
        assert args[1:], "lightning-methods fed table needs run directories"
        return
    if command == "grid":
        fit_args = args[args.index("--") + 1:] if "--" in args else []
        ns = parser.parse_args(args[: args.index("--")] if "--" in args else args)
        if fit_args and ns.command == "fit":
            _parse_lightning("fit", ["--config", ns.config[0], *fit_args])
        return
    if command == "hpn-sweep":
        ns, extra = parser.parse_known_args(args)
        if extra:
            _parse_lightning("fit", ["--config", str(ns.config), *extra])
        return
    parser.parse_args(args)


COMMANDS = doc_commands()


def test_the_docs_show_the_commands_this_test_reads():
    """The reader finds the commands (a broken reader would make the test below check nothing)."""
    commands = {_argv(line)[0] for _, line in COMMANDS}
    assert len(COMMANDS) >= 80
    assert {"fit", "test", "predict", *cli.COMMANDS} <= commands


def test_every_command_module_builds_its_parser():
    for name, (module, _) in cli.COMMANDS.items():
        assert callable(getattr(importlib.import_module(module), "build_parser", None)), name


@pytest.mark.parametrize(("where", "line"), COMMANDS, ids=[where for where, _ in COMMANDS])
def test_documented_command_parses(where, line, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    command, args, synopsis_alternatives = _argv(line)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            if command in cli.COMMANDS:
                _parse_package(command, args, synopsis_alternatives)
            else:
                assert command in cli.LIGHTNING_SUBCOMMANDS, f"no command {command!r}"
                _parse_lightning(command, args)
    except SystemExit as exit_:
        assert exit_.code in (0, None), f"{where}: `{line}` does not parse:\n{out.getvalue()[-1500:]}"
    assert not any(tmp_path.iterdir()), f"{where}: parsing `{line}` wrote files"
