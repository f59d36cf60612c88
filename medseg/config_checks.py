"""The checks ``medseg fit`` runs on its configuration before anything is built, and the one-line refusals of
jsonargparse's parse errors (unknown keys with the closest valid one, wrong types, missing or broken YAML files,
unknown networks or network arguments, a model for another task than the dataset's)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from medseg.errors import (
    ConfigError,
    closest,
    config_files,
    did_you_mean,
    key_origin,
    missing_config_file,
    yaml_syntax_error,
)
from medseg.resume import (
    checkpoint_summary,
)


def _raising(parser_kwargs: dict[str, Any] | None, subcommands: Any) -> dict[str, Any]:
    """``parser_kwargs`` with ``exit_on_error=False`` for the main parser and every subcommand's: a parse error
    raises ``ArgumentError`` (turned into one line by :func:`parse_refusal`) instead of printing the usage."""
    kwargs = dict(parser_kwargs or {})
    kwargs.setdefault("exit_on_error", False)
    for name in subcommands:
        kwargs[name] = {"exit_on_error": False, **kwargs.get(name, {})}
    return kwargs


def _check_ckpt_path(ckpt_path: Any) -> None:
    """Refuse a ``--ckpt_path`` file that is missing, truncated or unsafe (``best``/``last``/``hpc`` pass)."""
    if ckpt_path in (None, "best", "last", "hpc"):
        return
    path = Path(str(ckpt_path))
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt_path {path}: no such checkpoint file")
    checkpoint_summary(path)


def check_network(config: Any, argv: list[str]) -> None:
    """Refuse an unknown network (or an import path ``module:callable`` that cannot be imported or called), or an
    argument it does not take, naming where it was written, with the closest valid name (the registry would
    refuse it too, but at build time, deep inside jsonargparse)."""
    from medseg.models.registry import get_model_spec, list_models

    name, network_args = config.get("model.init_args.network"), config.get("model.init_args.network_args")
    if not isinstance(name, str):
        return
    try:
        spec = get_model_spec(name)
    except ValueError as err:
        where = _where(["model", "network"], None, argv, "model.init_args.network")
        if ":" in name:  # an import path "package.module:callable" (medseg.models.external): why it cannot be used
            raise ConfigError(f"{where}: {err}") from err
        raise ConfigError(f"{where}: no network named '{name}'{did_you_mean(name, list_models())} "
                          f"(networks: {', '.join(list_models())})") from err
    for key in network_args or {}:
        where = _where(["model", "network_args"], str(key), argv, "model.init_args.network_args")
        if key in spec.unsupported:
            raise ConfigError(f"{where}: network '{spec.name}' does not support '{key}': {spec.unsupported[key]}")
        if key not in spec.kwargs:
            raise ConfigError(f"{where}: network '{spec.name}' has no argument '{key}'"
                              f"{did_you_mean(str(key), spec.kwargs)} (its arguments: {', '.join(spec.kwargs)})")


# The file-name prefix of the shipped configs of each task (configs/<prefix><dims>d_<network>.yaml).
CONFIG_PREFIX = {"segmentation": "seg", "classification": "cls", "multitask": "mtl", "enhancement": "enh"}


def check_task(config: Any, argv: list[str]) -> None:
    """Refuse a model of another task than the dataset's (a classification model on a segmentation dataset, a
    segmentation model on a multitask or enhancement one, ...), before anything is built.

    Raises:
        ConfigError: naming the dataset description and the config that chose the model, with a config of the
            dataset's task beside the first config file when there is one.
        DatasetError: the dataset description cannot be read.
    """
    from medseg.data.datalist import load_dataset

    root, class_path = config.get("data.root"), config.get("model.class_path")
    if not root or not isinstance(class_path, str):
        return
    spec = load_dataset(root)
    model_class = _import(class_path)
    if model_class is None or getattr(model_class, "TASK", None) in (None, spec.task):
        return
    origin = key_origin(["model", "class_path"], None, argv)
    chosen = f" ({origin.where})" if origin else ""
    prefix = CONFIG_PREFIX.get(spec.task, "seg")
    files = config_files(argv)
    folder = Path(files[0]).parent if files else Path("configs")
    examples = folder.glob(f"{prefix}{config.get('data.spatial_dims') or ''}d_*.yaml")
    shortest = min(examples, key=lambda path: (len(path.name), path.name), default=None)
    example = f", e.g. --config {shortest}" if shortest else ""
    raise ConfigError(f"{spec.source}: a {spec.task} dataset, but the model is {model_class.__name__}{chosen}; "
                      f"use a {spec.task} config{example}")


def _where(head: list[str], leaf: str | None, argv: list[str], default: str) -> str:
    origin = key_origin(head, leaf, argv)
    return origin.where if origin else default


def _import(class_path: str) -> type | None:
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return found if isinstance(found, type) else None


def _refusal_of(err: BaseException) -> BaseException | None:
    """The one-line refusal behind an error of building the classes: medseg's own error, or a ValueError that
    medseg's code raised (a bad option value, e.g. ``norm: bach``) as a :class:`ConfigError`."""
    import traceback

    import medseg
    from medseg.training import medseg_error

    own = medseg_error(err)
    if own is not None:
        return own
    innermost = _chain(err)[-1]
    frames = traceback.extract_tb(innermost.__traceback__)
    package = str(Path(medseg.__file__).parent)
    if type(innermost) is ValueError and frames and frames[-1].filename.startswith(package):
        return ConfigError(str(innermost))
    return None


# -- parse errors --------------------------------------------------------------------------------------------

_NOT_KEYS = ("help", "print_config", "subcommand", "print_shtab")
_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
_CLASS_PATH = re.compile(r"class_path[=\s]*'([\w.]+)'")
_EXPECTED = re.compile(r"^\s*-?\s*Expected a (<class '(\w+)'>|typing\.Literal\[(.*)\])\.?(?: Got value: (.*))?$")


def parse_refusal(err: BaseException, argv: list[str], parser: Any) -> ConfigError:
    """One line for a jsonargparse parse error: the file and line (or the option) and the key, the reason, and
    the closest valid key for an unknown one.

    Args:
        err: the ``ArgumentError`` raised with ``exit_on_error=False``.
        argv: the command line (``fit --config ...``).
        parser: the subcommand's parser (its keys are the valid ones), if known.
    """
    files = config_files(argv)
    chain = _chain(err)
    found = missing_config_file(files)
    if found is None and any(type(e).__module__.startswith("yaml") for e in chain):
        found = yaml_syntax_error(files)
    if found is not None:
        return ConfigError(found)
    texts = [str(e) for e in chain]
    unknown = _unknown_key(texts)
    if unknown is not None:
        return ConfigError(_unknown_message(*unknown, argv, parser, texts))
    if isinstance(chain[-1], (ImportError, AttributeError)):
        return ConfigError(_class_path_message(texts, argv))
    message = _bad_value_message(texts, argv)
    if "arguments are required" in message and not files:
        message += "; give a config, e.g. --config configs/seg3d_unet.yaml"
    return ConfigError(message)


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and its causes, outermost first."""
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _unknown_key(texts: list[str]) -> tuple[list[str], str | None, bool] | None:
    """``(head, leaf, in_class)`` of an unknown key: ``head`` its dotted parts (or the section, when ``leaf``
    is an unknown option of a class inside it); ``None`` when the error is not about an unknown key."""
    for text in texts:
        match = re.search(r"does not accept option '([^']+)'", text) or re.search(
            r"unrecognized arguments: (\S+)", text)
        if match:
            return match.group(1).lstrip("-").split("=")[0].split("."), None, False
    for text in reversed(texts):
        match = re.search(r"Option '([^']+)' is not accepted", text)
        if match:
            keys = _parser_keys(texts)
            return (keys[0].split(".") if keys else []), match.group(1), True
    return None


def _parser_keys(texts: list[str]) -> list[str]:
    """The ``Parser key "..."`` each error names in its first line, outermost first, without repeats."""
    keys: list[str] = []
    for text in texts:
        for key in _PARSER_KEY.findall(_first_line(text)):
            if not keys or keys[-1] != key:
                keys.append(key)
    return keys


def _unknown_message(head: list[str], leaf: str | None, in_class: bool, argv: list[str], parser: Any,
                     texts: list[str]) -> str:
    origin = key_origin(head, leaf, argv)
    written = list(origin.key) if origin else [*head, *([leaf] if leaf else [])]
    if in_class:
        index, valid = len(written) - 1, _class_keys(_innermost_class_path(texts))
    else:
        dests = _dests(parser)
        index = _first_unknown(written, dests)
        valid = _children(dests, written[:index])
    typo, section, rest = written[index], ".".join(written[:index]), "".join(f".{p}" for p in written[index + 1:])
    command = argv[0] if argv else "fit"
    match = closest(typo, valid)
    if origin is None or (origin.file is None and origin.option == origin.key):
        option = f"--{section}.{match}{rest}" if section else f"--{match}{rest}"
        hint = f"; did you mean '{option}'?" if match else _valid_list(valid, command)
        return f"{origin.where if origin else '--' + '.'.join(written)}: unknown option{hint}"
    under = f" under '{section}'" if section else ""
    hint = f"; did you mean '{match}'?" if match else _valid_list(valid, command)
    return f"{origin.where}: unknown key '{typo}'{under}{hint}"


def _valid_list(valid: list[str], command: str) -> str:
    if 0 < len(valid) <= 12:
        return f" (valid: {', '.join(sorted(valid))})"
    return f"; `medseg {command} --help` lists the valid keys"


def _dests(parser: Any) -> list[str]:
    actions = getattr(parser, "_actions", [])
    return [a.dest for a in actions if a.dest not in _NOT_KEYS and not a.dest.endswith(".help")]


def _first_unknown(parts: list[str], dests: list[str]) -> int:
    """The index of the first part of ``parts`` that no valid key has at that place."""
    known = {".".join(dest.split(".")[: i + 1]) for dest in dests for i in range(dest.count(".") + 1)}
    return next((i for i in range(len(parts)) if ".".join(parts[: i + 1]) not in known), len(parts) - 1)


def _children(dests: list[str], parent: list[str]) -> list[str]:
    prefix = ".".join(parent)
    if not prefix:
        return sorted({dest.split(".")[0] for dest in dests})
    return sorted({dest[len(prefix) + 1:].split(".")[0] for dest in dests if dest.startswith(prefix + ".")})


def _innermost_class_path(texts: list[str]) -> str | None:
    for text in reversed(texts):
        found = _CLASS_PATH.findall(text)
        if found:
            return found[-1]
    return None


def _class_keys(class_path: str | None) -> list[str]:
    """The init arguments jsonargparse accepts for ``class_path``."""
    from jsonargparse import ArgumentParser

    model_class = _import(class_path) if class_path else None
    if model_class is None:
        return []
    parser = ArgumentParser(exit_on_error=False)
    try:
        parser.add_class_arguments(model_class, fail_untyped=False)
    except Exception:  # a class jsonargparse cannot describe: no suggestion, still one line
        return []
    return sorted({dest.split(".")[0] for dest in _dests(parser)})


def _bad_value_message(texts: list[str], argv: list[str]) -> str:
    """``"<where>: <key>: expected int or null, got 'ten'"`` for a value of the wrong type (or jsonargparse's
    innermost reason, on one line, for anything else)."""
    keys = _parser_keys(texts)
    reason = _value_reason(texts)
    if not keys:
        return reason
    head, leaf = keys[0].split("."), (keys[-1] if len(keys) > 1 else None)
    origin = key_origin(head, leaf, argv)
    if origin is None:
        return f"{'.'.join([*head, *([leaf] if leaf else [])])}: {reason}"
    if origin.file is None:
        return f"{origin.where}: {reason}"
    return f"{origin.where}: {'.'.join(origin.key)}: {reason}"


def _class_path_message(texts: list[str], argv: list[str]) -> str:
    """``"<where>: no class 'a.b.C' (...)"`` for a ``class_path`` that cannot be imported, with the closest
    class of that module."""
    import importlib

    keys = _parser_keys(texts)
    class_path = _innermost_class_path(texts) or ""
    head = [*(keys[0].split(".") if keys else []), "class_path"]
    origin = key_origin(head, None, argv)
    where = f"{origin.where}: {'.'.join(origin.key)}" if origin and origin.file else (
        origin.where if origin else ".".join(head))
    module, _, name = class_path.rpartition(".")
    try:
        classes = [n for n, v in vars(importlib.import_module(module)).items()
                   if isinstance(v, type) and v.__module__ == module]  # its own, not what it imports
    except (ImportError, ValueError):
        classes = []
    hint = did_you_mean(name, classes, f"{module}.")
    return f"{where}: cannot import '{class_path}' ({_first_line(texts[-1])}){hint}"


def _value_reason(texts: list[str]) -> str:
    innermost = _first_line(texts[-1]) or "not a valid configuration"
    single = _EXPECTED.match(innermost)
    value = single.group(4) if single else None
    last_key = max((i for i, t in enumerate(texts) if _PARSER_KEY.search(_first_line(t))), default=-1)
    unions = [i for i, t in enumerate(texts) if _first_line(t).startswith("Does not validate against any")]
    if unions and unions[-1] > last_key:
        kinds = [m for line in texts[unions[-1]].splitlines() if (m := _EXPECTED.match(line))]
        if kinds and value is not None:
            return f"expected {_kinds(kinds)}, got '{value}'"
    if single and value is not None:
        return f"expected {_kinds([single])}, got '{value}'"
    return innermost


def _kinds(matches: list[re.Match[str]]) -> str:
    """``int or null``, ``one of [...] or null``: what jsonargparse's ``Expected a ...`` lines accept."""
    types = [("null" if m.group(2) == "NoneType" else m.group(2)) for m in matches if m.group(2)]
    literals = [m.group(3) for m in matches if m.group(3) is not None]
    kinds = ([f"one of [{', '.join(literals)}]"] if literals else []) + types
    return " or ".join(dict.fromkeys(kinds))
