"""Model registry: a plain name -> builder table, and the option vocabulary every builder shares.

Each network is described by a :class:`ModelSpec` (name, task, builder, encoder definition, unsupported
options). The built-in specs are listed explicitly in ``segmentation.MODELS`` and ``classification.MODELS`` and
registered by ``medseg/models/__init__.py``; nothing is discovered by walking the package.

Builders have the signature ``builder(spatial_dims, in_channels, out_channels, *, <options>)``; the keyword-only
parameters are the options the model accepts. :func:`create_model` checks user options against that list before
calling the builder, so a typo gives a ``ValueError`` naming the model and its options rather than a
``TypeError`` deep inside MONAI.

Shared option names (where a model supports them):

* ``channels``: feature widths, one per resolution level, top level first. ``len(channels) == depth + 1``.
* ``depth`` / ``base_channels``: alternative to ``channels``; gives ``channels = base_channels * 2**i`` for
  ``i = 0..depth`` (``depth`` = number of down-sampling levels). ``channels`` and ``base_channels`` are
  exclusive; ``depth`` together with ``channels`` must agree with its length.
* ``norm``: ``"batch"``, ``"instance"``, ``"group"`` (case-insensitive) or MONAI's ``(name, {args})`` tuple.
  ``"group"`` uses the largest group count <= 8 that divides every feature width.
* ``act``: ``"relu"``, ``"leakyrelu"``, ``"prelu"``, ``"elu"``, ``"gelu"``, ``"selu"``, ``"swish"``, ``"mish"``
  (case-insensitive) or ``(name, {args})``.
* ``dropout``: probability in ``[0, 1)``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

TASKS: tuple[str, ...] = ("segmentation", "classification", "multitask")
ACTIVATIONS: tuple[str, ...] = ("relu", "leakyrelu", "prelu", "elu", "gelu", "selu", "swish", "mish")
NORMS: tuple[str, ...] = ("batch", "instance", "group")

#: A layer option as MONAI takes it: a name, or ``(name, {constructor args})``.
LayerArg = str | tuple[str, dict[str, Any]]


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry.

    Attributes:
        name: Registry name (lower case), e.g. ``"unet"``.
        task: ``"segmentation"`` (output ``(B, C, *spatial)``), ``"classification"`` (output ``(B, C)``) or
            ``"multitask"`` (``forward`` gives segmentation logits ``(B, C, *spatial)``; see
            :mod:`medseg.models.multitask` for the image-level class head).
        builder: ``builder(spatial_dims, in_channels, out_channels, **options) -> nn.Module``; its keyword-only
            parameters are the accepted options.
        encoder: ``encoder(net) -> list[nn.Module]``: the submodules of a built network that form its encoder
            (used by :func:`medseg.models.freeze_encoder`).
        unsupported: Shared option names this model cannot honour, mapped to the reason shown to the user.
        description: One line for listings and docs.
        dims: The ``spatial_dims`` the model can be built in; :func:`create_model` refuses the others.
    """

    name: str
    task: str
    builder: Callable[..., nn.Module]
    encoder: Callable[[nn.Module], list[nn.Module]]
    unsupported: Mapping[str, str] = field(default_factory=dict)
    description: str = ""
    dims: tuple[int, ...] = (2, 3)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"Model '{self.name}': task must be one of {TASKS}, got '{self.task}'.")
        overlap = set(self.unsupported) & set(self.kwargs)
        if overlap:
            raise ValueError(
                f"Model '{self.name}': options {sorted(overlap)} are both accepted and unsupported."
            )

    @property
    def kwargs(self) -> tuple[str, ...]:
        """Names of the options (keyword-only builder parameters) this model accepts, sorted."""
        params = inspect.signature(self.builder).parameters.values()
        return tuple(sorted(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY))


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec, *, overwrite: bool = False) -> ModelSpec:
    """Add a model to the registry.

    Args:
        spec: The entry to add.
        overwrite: Replace an existing entry of the same name instead of raising.

    Returns:
        ``spec``, so the call can be used in an assignment.

    Raises:
        ValueError: If the name is taken and ``overwrite`` is False.
    """
    name = spec.name.lower()
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"Model '{name}' is already registered.")
    _REGISTRY[name] = spec
    return spec


def get_model_spec(name: str) -> ModelSpec:
    """Return the registry entry for ``name`` (case-insensitive), or the network an import path
    ``"package.module:callable"`` names (see :mod:`medseg.models.external`).

    Raises:
        ValueError: Unknown name (the message lists the registered models), or an import path that cannot be used.
    """
    from medseg.models import external

    if external.is_import_path(name):
        return external.import_spec(name)
    key = name.strip().lower() if isinstance(name, str) else None
    if key not in _REGISTRY:
        external.load_entry_points()
    if key not in _REGISTRY:
        raise ValueError(f"Unknown model '{name}'{external.entry_point_failure(str(name))}. "
                         f"Available models: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[key]


def list_models(task: str | None = None) -> list[str]:
    """Registered model names (medseg's and the ``medseg.models`` entry points'), sorted, optionally only those
    of one task.

    Args:
        task: ``"segmentation"``, ``"classification"`` or None for all.

    Raises:
        ValueError: Unknown task.
    """
    if task is not None and task not in TASKS:
        raise ValueError(f"Unknown task '{task}'. Valid tasks: {', '.join(TASKS)}.")
    from medseg.models.external import load_entry_points

    load_entry_points()
    return sorted(name for name, spec in _REGISTRY.items() if task is None or spec.task == task)


def model_task(name: str) -> str:
    """Task of a registered model: ``"segmentation"`` or ``"classification"``."""
    return get_model_spec(name).task


def model_kwargs(name: str) -> tuple[str, ...]:
    """Options accepted by a registered model (see :attr:`ModelSpec.kwargs`)."""
    return get_model_spec(name).kwargs


def create_model(
    name: str, spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any
) -> nn.Module:
    """Build a registered network.

    Args:
        name: Registry name (see :func:`list_models`), case-insensitive.
        spatial_dims: 2 for ``(B, C, H, W)`` inputs, 3 for ``(B, C, H, W, D)`` inputs.
        in_channels: Input channels ``C``.
        out_channels: Output channels (segmentation) or number of classes (classification).
        **kwargs: Model options; see :func:`model_kwargs` and the module docstring.

    Returns:
        A plain ``nn.Module``. Segmentation: ``(B, in_channels, *S) -> (B, out_channels, *S)``;
        classification: ``(B, in_channels, *S) -> (B, out_channels)`` logits.

    Raises:
        ValueError: Unknown name, bad dimensions, an option the model does not accept, or a bad option value.
    """
    spec = get_model_spec(name)
    if spatial_dims not in (2, 3):
        raise ValueError(f"Model '{spec.name}': spatial_dims must be 2 or 3, got {spatial_dims!r}.")
    if spatial_dims not in spec.dims:
        raise ValueError(f"Model '{spec.name}' is {'/'.join(f'{d}D' for d in spec.dims)} only: "
                         f"spatial_dims={spatial_dims} is not supported.")
    for label, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Model '{spec.name}': {label} must be a positive int, got {value!r}.")
    for key in kwargs:
        if key in spec.unsupported:
            raise ValueError(f"Model '{spec.name}' does not support option '{key}': {spec.unsupported[key]}")
    unknown = sorted(set(kwargs) - set(spec.kwargs))
    if unknown:
        raise ValueError(
            f"Model '{spec.name}' got unknown option(s) {', '.join(map(repr, unknown))}. "
            f"Accepted options: {', '.join(spec.kwargs)}."
        )
    return spec.builder(spatial_dims, in_channels, out_channels, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Option helpers shared by the builders.
# ---------------------------------------------------------------------------------------------------------


def resolve_channels(
    model: str,
    channels: Sequence[int] | None,
    depth: int | None,
    base_channels: int | None,
    *,
    default_depth: int,
    default_base: int,
) -> tuple[int, ...]:
    """Turn ``channels`` or ``depth``/``base_channels`` into one tuple of widths (top level first).

    Args:
        model: Model name, for error messages.
        channels: Explicit widths, or None.
        depth: Number of down-sampling levels; the result has ``depth + 1`` widths.
        base_channels: Width of the top level; level ``i`` gets ``base_channels * 2**i``.
        default_depth: Depth used when neither ``channels`` nor ``depth`` is given.
        default_base: Base width used when neither ``channels`` nor ``base_channels`` is given.

    Raises:
        ValueError: Both ``channels`` and ``base_channels`` given, ``depth`` disagreeing with ``channels``, or
            non-positive values.
    """
    if channels is not None:
        if base_channels is not None:
            raise ValueError(f"Model '{model}': give either 'channels' or 'base_channels', not both.")
        if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence) or len(channels) == 0:
            raise ValueError(
                f"Model '{model}': 'channels' must be a non-empty sequence of ints, got {channels!r}."
            )
        widths = tuple(channels)
        if depth is not None and depth != len(widths) - 1:
            raise ValueError(
                f"Model '{model}': depth={depth} disagrees with channels={list(widths)} "
                f"(len(channels) must be depth + 1)."
            )
    else:
        depth = default_depth if depth is None else depth
        base = default_base if base_channels is None else base_channels
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"Model '{model}': 'depth' must be an int >= 0, got {depth!r}.")
        if isinstance(base, bool) or not isinstance(base, int) or base < 1:
            raise ValueError(f"Model '{model}': 'base_channels' must be a positive int, got {base!r}.")
        widths = tuple(base * 2**i for i in range(depth + 1))
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in widths):
        raise ValueError(f"Model '{model}': channel widths must be positive ints, got {list(widths)}.")
    return widths


def _split_layer_arg(model: str, option: str, value: LayerArg, valid: tuple[str, ...]) -> tuple[str, dict]:
    if isinstance(value, str):
        name, args = value, {}
    elif isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], str):
        name, args = value[0], dict(value[1])
    else:
        raise ValueError(f"Model '{model}': '{option}' must be a name or (name, {{args}}), got {value!r}.")
    name = name.strip().lower()
    if name not in valid:
        raise ValueError(f"Model '{model}': unknown {option} '{value}'. Valid: {', '.join(valid)}.")
    return name, args


def resolve_act(model: str, act: LayerArg | None) -> LayerArg | None:
    """Validate an activation option and return it in MONAI's form (None stays None = model default).

    Raises:
        ValueError: Unknown activation name; the message lists the valid ones.
    """
    if act is None:
        return None
    name, args = _split_layer_arg(model, "act", act, ACTIVATIONS)
    return (name, args) if args else name


def resolve_norm(model: str, norm: LayerArg | None, widths: Sequence[int]) -> LayerArg | None:
    """Validate a normalisation option and return it in MONAI's form (None stays None = model default).

    Args:
        model: Model name, for error messages.
        norm: ``"batch"``, ``"instance"``, ``"group"`` or ``(name, {args})``.
        widths: Every channel count a norm layer will see; ``"group"`` picks ``num_groups`` dividing them all.

    Raises:
        ValueError: Unknown name, or a ``num_groups`` that does not divide every width.
    """
    if norm is None:
        return None
    name, args = _split_layer_arg(model, "norm", norm, NORMS)
    if name == "group":
        common = math.gcd(*widths)
        if "num_groups" not in args:
            args["num_groups"] = max(g for g in range(1, 9) if common % g == 0)
        elif common % args["num_groups"] != 0:
            raise ValueError(
                f"Model '{model}': num_groups={args['num_groups']} does not divide every feature width "
                f"{sorted(set(widths))}."
            )
    return (name, args) if args else name


def check_dropout(model: str, dropout: float) -> float:
    """Return ``dropout`` as a float after checking ``0 <= dropout < 1``."""
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"Model '{model}': 'dropout' must be a float in [0, 1), got {dropout!r}.")
    return float(dropout)


def monai_norm(model: str, norm: LayerArg | None, default: str, widths: Sequence[int]) -> LayerArg:
    """A norm option (None = ``default``) in MONAI's form; instance norm is affine, as in nnU-Net."""
    resolved = resolve_norm(model, default if norm is None else norm, widths)
    name, args = (resolved, {}) if isinstance(resolved, str) else resolved
    if name == "instance":
        args = {"affine": True, **args}
    return (name, args) if args else name
