"""Errors the ``medseg`` command reports as one line and exit code 2 (no traceback), and the helpers that make
such a line name what to fix: the closest valid name (:func:`did_you_mean`) and where in the config files or on
the command line a key was written (:func:`key_origin`)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path


class ResumeError(ValueError):
    """A checkpoint that cannot continue this run (another model, other classes)."""


class ConfigError(ValueError):
    """Options that cannot work together, found before anything runs."""


class InputError(ValueError):
    """An input file medseg cannot use (another dimensionality, NaN voxels, ...); ``str`` is
    ``"<file>: <reason>"``."""


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The one of ``choices`` closest to ``word`` (:func:`difflib.get_close_matches`), ``None`` when none is."""
    close = difflib.get_close_matches(word, sorted(set(choices)), n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(word: str, choices: Iterable[str], prefix: str = "") -> str:
    """``"; did you mean '<prefix>x'?"`` for the closest of ``choices`` to ``word``, or ``""`` when none is."""
    match = closest(word, choices)
    return f"; did you mean '{prefix}{match}'?" if match else ""


@dataclass(frozen=True)
class KeyOrigin:
    """Where a config key was written.

    Attributes:
        key: the key's parts as written there (``["model", "init_args", "netwrok"]``).
        file: the config file, or ``None`` for the command line.
        line: the key's line in ``file`` (1-based), or 0.
        option: the command-line option that holds the key (``key`` itself, or a section of it whose value is
            a mapping); ``()`` for a file.
    """

    key: tuple[str, ...]
    file: str | None = None
    line: int = 0
    option: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        """``"<file>: line N"`` for a config file, ``"--a.b.c"`` for an option of the command line."""
        return f"{self.file}: line {self.line}" if self.file else "--" + ".".join(self.option or self.key)


def config_files(argv: Sequence[str]) -> list[str]:
    """The ``--config``/``-c`` files of a command line, in the order given."""
    files = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def key_origin(head: Sequence[str], leaf: str | None, argv: Sequence[str]) -> KeyOrigin | None:
    """Where the key ``head[.…].leaf`` was written: the command line (which wins over files) or the last config
    file that has it. ``init_args`` levels are ignored when comparing, so ``model.netwrok`` finds
    ``model.init_args.netwrok``; a ``leaf`` of ``None`` means the key is ``head`` itself.

    An option whose value is a JSON/YAML mapping (``--model.init_args.network_args '{"channel": 4}'``) counts
    when its value names the rest of the key.
    """
    target = [*head, leaf] if leaf else list(head)
    found = None
    for index, arg in enumerate(argv):
        if not arg.startswith("--") or arg.startswith("--config"):
            continue
        name, _, value = arg[2:].partition("=")
        if not value and index + 1 < len(argv):
            value = argv[index + 1]
        parts = name.split(".")
        if _matches(parts, head, leaf):
            found = KeyOrigin(tuple(parts), option=tuple(parts))
        elif _inside(parts, target, value):
            found = KeyOrigin((*parts, *_plain(target)[len(_plain(parts)):]), option=tuple(parts))
    if found:
        return found
    for file in reversed(config_files(argv)):
        matches = [(parts, line) for parts, line in yaml_keys(file) if _matches(parts, head, leaf)]
        if matches:
            return KeyOrigin(tuple(matches[-1][0]), file, matches[-1][1])
    return None


def _plain(parts: Sequence[str]) -> list[str]:
    return [part for part in parts if part != "init_args"]


def _matches(parts: Sequence[str], head: Sequence[str], leaf: str | None) -> bool:
    plain, head = _plain(parts), _plain(head)
    if leaf is None:  # the key itself (a section's ``init_args`` is not)
        return plain == head and parts[-1] != "init_args"
    return len(plain) > len(head) and plain[: len(head)] == head and plain[-1] == leaf


def _inside(parts: Sequence[str], target: Sequence[str], value: str) -> bool:
    """Whether option ``parts`` is a section of ``target`` whose (mapping) value names the rest of it."""
    plain, target = _plain(parts), _plain(target)
    rest = target[len(plain):]
    named = all(re.search(rf"(^|[{{,\s\"']){re.escape(part)}[\"']?\s*:", value) for part in rest)
    return bool(rest) and target[: len(plain)] == plain and named


def yaml_keys(path: str | Path) -> list[tuple[list[str], int]]:
    """Every mapping key of a YAML file as ``(parts, line)``, parents before children; ``[]`` when the file
    cannot be read or parsed."""
    import yaml

    try:
        root = yaml.compose(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []
    keys: list[tuple[list[str], int]] = []
    pending = [(root, [])]
    while pending:
        node, prefix = pending.pop(0)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                parts = [*prefix, *str(key.value).split(".")]
                keys.append((parts, key.start_mark.line + 1))
                pending.append((value, parts))
    return keys


def yaml_syntax_error(files: Sequence[str]) -> str | None:
    """``"<file>: line L, column C: YAML syntax error: <problem>"`` for the first of ``files`` that is not valid
    YAML, else ``None``."""
    import yaml

    for file in files:
        try:
            yaml.safe_load(Path(file).read_text())
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark or err.context_mark
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            problem = err.problem or err.context or "not valid YAML"
            return f"{file}: {where}YAML syntax error: {problem} (check the indentation and the ':' there)"
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
    return None


def missing_config_file(files: Sequence[str]) -> str | None:
    """``"<file>: no such config file"`` (with the closest file of that folder) for the first of ``files`` that
    does not exist, else ``None``."""
    for file in files:
        path = Path(file)
        if not path.is_file():
            folder = path.parent
            siblings = [p.name for p in folder.glob("*") if p.suffix in (".yaml", ".yml", ".json")] \
                if folder.is_dir() else []
            prefix = "" if str(folder) == "." else f"{folder}/"
            return f"{file}: no such config file{did_you_mean(path.name, siblings, prefix)}"
    return None
