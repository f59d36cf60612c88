"""Networks from other packages: ``network: "package.module:callable"`` and the ``medseg.models`` entry points.

An import path ``"package.module:callable"`` names any ``nn.Module`` factory (a class or a function). It is
called by keyword, ``callable(spatial_dims=, in_channels=, out_channels=, **network_args)``; its other named
parameters are the network's options (``network_args``), and it must return an ``nn.Module``. The object may
also be a :class:`~medseg.models.registry.ModelSpec`, which declares the task, the encoder (for
``freeze_encoder``) and the options it cannot honour; its builder is called as medseg's own are.

A package registers plain names through the entry-point group ``medseg.models`` (``pyproject.toml``:
``[project.entry-points."medseg.models"] mynet = "mypkg.nets:MYNET_SPEC"``); each entry point loads a
``ModelSpec`` or a factory as above, and is registered under the entry point's name, once per process, the first
time a name is looked up or listed. An entry point that fails to load, or takes a name medseg already has, is
left out and reported by ``medseg models`` and by a lookup of its name.

A checkpoint records where its network came from (:func:`network_source`); :func:`source_problem` says, naming
the module and the package to install, why it cannot be rebuilt here.

Importing a module runs its code, and the callable is called with the config's (or the checkpoint's) network
arguments: configs and checkpoints are trusted input. Standard-library modules are refused (no network factory
lives there), and so is a callable that does not take ``spatial_dims``, ``in_channels`` and ``out_channels``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import inspect
import logging
import re
import sys
from pathlib import Path
from typing import Any

from torch import nn

from medseg.models.registry import TASKS, ModelSpec, register_model

ENTRY_POINT_GROUP = "medseg.models"
DIMENSION_ARGS = ("spatial_dims", "in_channels", "out_channels")
_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_IMPORT_PATH = re.compile(rf"^({_DOTTED}):({_DOTTED})$")
logger = logging.getLogger("medseg")


def is_import_path(name: Any) -> bool:
    """Whether a network name is an import path (``"module:callable"``) rather than a registry name."""
    return isinstance(name, str) and ":" in name


def split_import_path(name: str) -> tuple[str, str]:
    """``("package.module", "callable")`` of ``"package.module:callable"``.

    Raises:
        ValueError: not of that form, or a standard-library module.
    """
    match = _IMPORT_PATH.match(name.strip())
    if not match:
        raise ValueError(f"network '{name}' is not an import path 'package.module:callable'")
    module, attribute = match.groups()
    if module.split(".")[0] in sys.stdlib_module_names:
        raise ValueError(f"network '{name}': '{module}' is a standard-library module, not a network's package")
    return module, attribute


@functools.lru_cache(maxsize=64)
def import_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of the network an import path names (imported once per process).

    Raises:
        ValueError: a malformed path, a module that cannot be imported, a missing attribute, an object that is
            neither a ``ModelSpec`` nor a callable taking ``spatial_dims``/``in_channels``/``out_channels``.
    """
    module_name, attribute = split_import_path(name)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"network '{name}': module '{module_name}' is not importable ({err}); install the "
                         "package that provides it, or add its folder to PYTHONPATH") from err
    except Exception as err:  # the module's own code failed while it was imported
        raise ValueError(f"network '{name}': importing '{module_name}' failed "
                         f"({type(err).__name__}: {err})") from err
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            public = sorted(n for n in vars(module) if not n.startswith("_")) if target is module else []
            from medseg.errors import did_you_mean

            raise ValueError(f"network '{name}': module '{module_name}' has no '{attribute}'"
                             f"{did_you_mean(part, public, f'{module_name}:')}")
        target = getattr(target, part)
    if isinstance(target, ModelSpec):
        return dataclasses.replace(target, name=name)
    return factory_spec(name, target)


def factory_spec(name: str, factory: Any, task: str = "segmentation", description: str = "") -> ModelSpec:
    """A :class:`ModelSpec` for a bare ``nn.Module`` factory, called by keyword.

    Its options are the factory's named parameters other than ``spatial_dims``/``in_channels``/``out_channels``,
    which it must name (a ``**kwargs`` catch-all neither counts for them nor adds options). It declares no
    encoder (``freeze_encoder`` refuses it) and is a segmentation network: a classifier is published as a
    :class:`ModelSpec` with ``task="classification"``.

    Raises:
        ValueError: ``factory`` is not callable or does not take the three dimension arguments by keyword.
    """
    if not callable(factory):
        raise ValueError(f"network '{name}' is a {type(factory).__name__}, not a callable that builds a network")
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError) as err:
        raise ValueError(f"network '{name}': its signature cannot be read ({err})") from err
    by_keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    # named explicitly: a bare **kwargs would let anything through (torch.nn.Identity takes *args, **kwargs)
    missing = [a for a in DIMENSION_ARGS if not (a in parameters and parameters[a].kind in by_keyword)]
    if missing:
        raise ValueError(f"network '{name}' does not take {', '.join(missing)} (its parameters: "
                         f"{', '.join(parameters) or 'none'}); wrap it in a function that does")
    options = [inspect.Parameter(p.name, inspect.Parameter.KEYWORD_ONLY, default=p.default)
               for p in parameters.values() if p.kind in by_keyword and p.name not in DIMENSION_ARGS]

    def build(spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
        net = factory(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **kwargs)
        if not isinstance(net, nn.Module):
            raise ValueError(f"network '{name}' returned a {type(net).__name__}, not a torch.nn.Module")
        return net

    dims = [inspect.Parameter(a, inspect.Parameter.POSITIONAL_OR_KEYWORD) for a in DIMENSION_ARGS]
    build.__signature__ = inspect.Signature([*dims, *options])  # type: ignore[attr-defined]

    def no_encoder(net: nn.Module) -> list[nn.Module]:
        raise ValueError(f"network '{name}' declares no encoder, so freeze_encoder cannot tell what to freeze; "
                         "publish a medseg.models.ModelSpec with an encoder for it")

    summary = (inspect.getdoc(factory) or "").split("\n")[0]
    return ModelSpec(name=name, task=task, builder=build, encoder=no_encoder, description=description or summary)


# -- where a network comes from -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _packages() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


@functools.lru_cache(maxsize=64)
def distribution_of(module_name: str) -> tuple[str, str] | None:
    """``(distribution name, version)`` of the installed distribution whose files hold ``module_name``, or None
    (a module on ``PYTHONPATH``, an editable install, a module not imported)."""
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    if not file:
        return None
    for candidate in _packages().get(module_name.split(".")[0], []):
        try:
            dist = importlib.metadata.distribution(candidate)
            relative = Path(file).resolve().relative_to(Path(str(dist.locate_file(""))).resolve())
        except (importlib.metadata.PackageNotFoundError, ValueError):
            continue
        if relative.as_posix() in {Path(str(f)).as_posix() for f in dist.files or ()}:
            return str(dist.metadata["Name"]), str(dist.version)
    return None


def network_source(name: str) -> dict[str, str | None] | None:
    """Where a network not built into medseg comes from, as plain data for a checkpoint: ``network`` (the name),
    ``module``, ``callable``, ``distribution`` and ``version`` (None when unknown), and ``entry_point`` for a
    name registered through ``medseg.models``. None for medseg's own networks."""
    if is_import_path(name):
        module, attribute = split_import_path(name)
        found = distribution_of(module)
        return {"network": name, "module": module, "callable": attribute,
                "distribution": found[0] if found else None, "version": found[1] if found else None}
    return load_entry_points().sources.get(str(name).strip().lower())


def source_problem(name: str, recorded: dict[str, Any] | None) -> str | None:
    """Why a checkpoint's network ``name`` cannot be built here (its module is gone, its entry point is not
    installed), naming the package to install; None when it can. ``recorded`` is the checkpoint's
    :func:`network_source`. A different installed version is logged, not refused."""
    from medseg.models.registry import get_model_spec

    if not isinstance(recorded, dict) or recorded.get("network") != name:
        recorded = None
    try:
        get_model_spec(name)
    except ValueError as err:
        return f"{err}{_install_hint(recorded)}"
    if recorded and recorded.get("distribution") and recorded.get("version"):
        now = network_source(name) or {}
        if now.get("distribution") == recorded["distribution"] and now.get("version") != recorded["version"]:
            logger.warning("network '%s' was trained with %s %s; %s is installed", name, recorded["distribution"],
                           recorded["version"], now.get("version"))
    return None


def _install_hint(recorded: dict[str, Any] | None) -> str:
    if not recorded or not recorded.get("distribution"):
        return ""
    pin = f"=={recorded['version']}" if recorded.get("version") else ""
    return f" (the checkpoint was trained with it from {recorded['distribution']}: pip install " \
           f"'{recorded['distribution']}{pin}')"


# -- entry points --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EntryPoints:
    """What the ``medseg.models`` entry points gave: each registered name's source, and why others were left
    out (``name -> reason``)."""

    sources: dict[str, dict[str, str | None]] = dataclasses.field(default_factory=dict)
    failures: dict[str, str] = dataclasses.field(default_factory=dict)


_LOADED: EntryPoints | None = None


def load_entry_points() -> EntryPoints:
    """Register the ``medseg.models`` entry points (the first call only) and return what they gave."""
    global _LOADED
    if _LOADED is None:
        _LOADED = EntryPoints()  # set first: a lookup inside a plugin's import does not load them again
        for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            _register(entry, _LOADED)
    return _LOADED


def _register(entry: importlib.metadata.EntryPoint, found: EntryPoints) -> None:
    from medseg.models.registry import _REGISTRY

    name = entry.name.strip().lower()
    dist = getattr(entry, "dist", None)
    origin = f"{dist.metadata['Name']} {dist.version}" if dist else entry.value
    try:
        if name in _REGISTRY:
            raise ValueError(f"the name '{name}' is taken by {'medseg' if name not in found.sources else 'another'}")
        loaded = entry.load()
        if isinstance(loaded, ModelSpec):
            if loaded.task not in TASKS:
                raise ValueError(f"task '{loaded.task}'")
            spec = dataclasses.replace(loaded, name=name)
        else:
            spec = factory_spec(name, loaded)
        register_model(spec)
    except Exception as err:  # a broken plugin is reported, and does not stop medseg
        found.failures[name] = f"entry point '{entry.name} = {entry.value}' of {origin} was not loaded " \
                               f"({type(err).__name__}: {err})"
        logger.debug(found.failures[name])
        return
    found.sources[name] = {"network": name, "entry_point": entry.name, "module": entry.module,
                           "callable": entry.attr, "distribution": dist.metadata["Name"] if dist else None,
                           "version": dist.version if dist else None}


def entry_point_failure(name: str) -> str:
    """``"; <why>"`` when the entry point of ``name`` failed to load, else ``""`` (for the unknown-name error)."""
    reason = load_entry_points().failures.get(str(name).strip().lower())
    return f" ({reason})" if reason else ""
