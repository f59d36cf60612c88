"""Capsule networks, 2D only: ``capsnet`` (Sabour et al. 2017) and ``segcaps`` (LaLonde & Bagci 2018).

A capsule is a vector whose length (in ``[0, 1)`` after :func:`squash`) is the evidence that its entity is
present and whose direction encodes the entity's pose. A layer of capsules gets *votes* ``u_hat[i, j]`` from every
input capsule ``i`` for every output capsule ``j`` and combines them by :func:`dynamic_routing`: coupling
coefficients ``c[i, :] = softmax(b[i, :])`` (summing to 1 over the output capsules), ``s_j = sum_i c_ij u_hat_ij``,
``v_j = squash(s_j)``, then ``b_ij += <u_hat_ij, v_j>``, three times.

Both networks return logits for medseg's cross-entropy / Dice losses. The class score of a capsule network is
the output capsule's length ``L = |s|^2 / (1 + |s|^2)``; we return its log-odds ``log(L / (1 - L)) = log |s|^2``
(computed from ``s``, so it is finite and stable). It is a monotone map of the length, so the predicted class is
the longest capsule, as in the papers; unlike the raw lengths (bounded in ``[0, 1)``, which caps a softmax
probability at ``e / (e + K - 1)`` and gives cross-entropy weak gradients), it lets the softmax reach 0 and 1.
The papers' margin loss and reconstruction decoders are left out: medseg trains with its own losses, and a
reconstruction head would need a second loss term the training modules do not have.

* ``capsnet``: a stem of ``depth + 1`` 3x3 convolutions (the first at stride 1, the others at stride 2, each
  followed by ``act``; Sabour's single 9x9 convolution is meant for 28x28 digits), a 3x3 stride-2 *primary
  capsule* convolution giving ``primary_capsules`` types of ``primary_dim``-vectors at every position, and the
  class capsules ``fc`` (one ``class_dim``-vector per class) reached by dynamic routing. Simplification: the
  transformation matrices ``W`` are shared by all positions of a primary capsule type (Sabour has one per
  primary capsule), so any input size works and the parameter count does not depend on it.
* ``segcaps``: a U-shaped network of convolutional capsules. A convolutional capsule layer applies one
  convolution (shared by all input capsule types, as in SegCaps) to every input type, giving votes for every
  output type at every position; routing is *locally constrained*: it runs per position, over the input types
  whose kernel window covers it. Level 0 is a 5x5 convolution read as one capsule type of ``channels[0]``
  atoms; every deeper level ``i`` is a stride-2 capsule layer and a stride-1 one (``capsule_types`` types of
  ``channels[i]`` atoms); the decoder up-samples with transposed-convolution capsule layers, concatenates the
  encoder capsules of the same level (along the types) and routes them into ``capsule_types`` types again; the
  last layer routes into one capsule type per output class, and the logits are their log-odds lengths.
  Simplifications: 3x3 kernels (SegCaps: 5x5), the same number of types at every level (SegCaps: 2 to 8), one
  capsule type per class instead of one foreground capsule, and no reconstruction branch.

Neither network has normalisation or dropout layers (the squash bounds every capsule; dropping pose components
would change the lengths that are the scores), so ``norm`` and ``dropout`` are refused. 3D inputs are refused
by the registry (``ModelSpec.dims``): volumetric routing over every voxel's votes is out of scope here.

Encoder (what :func:`medseg.models.freeze_encoder` freezes): ``capsnet`` everything but ``fc``; ``segcaps`` the
stem and the down-sampling path (``stem``, ``encoder``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from torch import nn

from medseg.models.registry import LayerArg, ModelSpec, resolve_act, resolve_channels

EPS = 1e-7
ROUTING_ITERATIONS = 3  # Sabour et al.


def squash(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``v = |s|^2 / (1 + |s|^2) * s / |s|``: the direction of ``s``, its length mapped into ``[0, 1)``."""
    sq = s.pow(2).sum(dim, keepdim=True)
    return s * (sq / (1.0 + sq) / torch.sqrt(sq + EPS))


def length_logits(s: torch.Tensor, dim: int) -> torch.Tensor:
    """Log-odds of the squashed length of ``s`` along ``dim``: ``log(L / (1 - L)) = log |s|^2``."""
    return torch.log(s.pow(2).sum(dim) + EPS)


def dynamic_routing(votes: torch.Tensor, iterations: int = ROUTING_ITERATIONS) -> tuple[torch.Tensor, ...]:
    """Routing by agreement.

    Args:
        votes: ``u_hat`` of shape ``(B, N_in, N_out, D, *positions)``: input capsule ``i``'s prediction of output
            capsule ``j``; routing runs independently at every trailing position.
        iterations: Routing iterations (>= 1).

    Returns:
        ``(v, s, c)``: output capsules ``v = squash(s)`` and their pre-activations ``s``, both
        ``(B, N_out, D, *positions)``, and the last coupling coefficients ``c`` ``(B, N_in, N_out, *positions)``.
    """
    logits = votes.new_zeros(votes.shape[:3] + votes.shape[4:])
    for iteration in range(iterations):
        coupling = torch.softmax(logits, dim=2)
        s = (coupling.unsqueeze(3) * votes).sum(1)
        v = squash(s, dim=2)
        if iteration < iterations - 1:
            logits = logits + (votes * v.unsqueeze(1)).sum(3)
    return v, s, coupling


def _check_positive(model: str, **values: int) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Model '{model}': '{key}' must be a positive int, got {value!r}.")


def _require_2d(model: str, spatial_dims: int) -> None:
    if spatial_dims != 2:
        raise ValueError(f"Model '{model}' is 2D only: spatial_dims={spatial_dims} is not supported.")


# ---------------------------------------------------------------------------------------------------------
# capsnet
# ---------------------------------------------------------------------------------------------------------


class ClassCapsules(nn.Module):
    """Fully connected capsule layer: every primary capsule votes ``W_t u`` for every class capsule.

    ``weight`` has shape ``(types, classes, class_dim, primary_dim)``: one matrix per primary capsule *type* and
    class (shared over positions).
    """

    def __init__(self, types: int, primary_dim: int, classes: int, class_dim: int, iterations: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(0.05 * torch.randn(types, classes, class_dim, primary_dim))
        self.iterations = iterations

    def forward(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``u``: ``(B, types, primary_dim, N)`` -> class capsules ``v`` and pre-activations ``s``, ``(B, K, D)``."""
        votes = torch.einsum("tkde,bten->btnkd", self.weight, u)
        votes = votes.reshape(u.shape[0], -1, *votes.shape[3:])  # (B, types * N, K, D)
        v, s, _ = dynamic_routing(votes, self.iterations)
        return v, s


class CapsNet(nn.Module):
    """2D capsule classifier; returns ``(B, K)`` log-odds of the class capsule lengths (see the module doc)."""

    def __init__(self, in_channels: int, classes: int, channels: Sequence[int], act: LayerArg,
                 primary_capsules: int, primary_dim: int, class_dim: int, iterations: int) -> None:
        super().__init__()
        layers, width = [], in_channels
        for i, out in enumerate(channels):
            layers.append(Convolution(2, width, out, strides=1 if i == 0 else 2, kernel_size=3, act=act, norm=None))
            width = out
        self.stem = nn.Sequential(*layers)
        self.primary = nn.Conv2d(width, primary_capsules * primary_dim, 3, stride=2, padding=1)
        self.primary_capsules, self.primary_dim = primary_capsules, primary_dim
        self.fc = ClassCapsules(primary_capsules, primary_dim, classes, class_dim, iterations)

    def capsules(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class capsules ``v`` and their pre-activations ``s``, ``(B, K, class_dim)``."""
        p = self.primary(self.stem(x))
        u = squash(p.reshape(p.shape[0], self.primary_capsules, self.primary_dim, -1), dim=2)
        return self.fc(u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return length_logits(self.capsules(x)[1], dim=-1)


def build_capsnet(
    spatial_dims: int, in_channels: int, out_channels: int, *, channels: Sequence[int] | None = None,
    depth: int | None = None, base_channels: int | None = None, act: LayerArg | None = None,
    primary_capsules: int = 8, primary_dim: int = 8, class_dim: int = 16,
    routing_iterations: int = ROUTING_ITERATIONS,
) -> CapsNet:
    """Build ``capsnet`` (2D; defaults: stem widths 16, 32, 64; 8 primary types of 8-vectors; 16-D classes)."""
    _require_2d("capsnet", spatial_dims)
    widths = resolve_channels("capsnet", channels, depth, base_channels, default_depth=2, default_base=16)
    _check_positive("capsnet", primary_capsules=primary_capsules, primary_dim=primary_dim, class_dim=class_dim,
                    routing_iterations=routing_iterations)
    return CapsNet(in_channels, out_channels, widths, resolve_act("capsnet", act) or "relu", primary_capsules,
                   primary_dim, class_dim, routing_iterations)


def capsnet_encoder(net: nn.Module) -> list[nn.Module]:
    """Everything but the class capsules ``fc``."""
    return [module for name, module in net.named_children() if name != "fc"]


# ---------------------------------------------------------------------------------------------------------
# segcaps
# ---------------------------------------------------------------------------------------------------------


class ConvCapsules(nn.Module):
    """Convolutional capsule layer with locally-constrained routing (SegCaps).

    Input ``(B, T_in, A_in, H, W)``; one convolution ``A_in -> T_out * A_out`` (transposed, kernel 4 stride 2,
    when ``up``) is applied to every input type, giving votes ``(B, T_in, T_out, A_out, H', W')``; a bias per
    output capsule is added to the votes, and routing runs per position over the input types.
    """

    def __init__(self, in_types: int, in_atoms: int, out_types: int, out_atoms: int, *, stride: int = 1,
                 up: bool = False, iterations: int = ROUTING_ITERATIONS) -> None:
        super().__init__()
        width = out_types * out_atoms
        if up:
            self.conv = nn.ConvTranspose2d(in_atoms, width, 4, stride=2, padding=1, bias=False)
        else:
            self.conv = nn.Conv2d(in_atoms, width, 3, stride=stride, padding=1, bias=False)
        self.bias = nn.Parameter(torch.full((out_types, out_atoms, 1, 1), 0.1))
        self.out_types, self.out_atoms, self.iterations = out_types, out_atoms, iterations

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Output capsules ``v`` and pre-activations ``s``, ``(B, T_out, A_out, H', W')``."""
        b, t = x.shape[:2]
        votes = self.conv(x.reshape(b * t, *x.shape[2:]))
        votes = votes.reshape(b, t, self.out_types, self.out_atoms, *votes.shape[2:]) + self.bias
        v, s, _ = dynamic_routing(votes, self.iterations)
        return v, s


class SegCaps(nn.Module):
    """2D U-shaped capsule network; returns ``(B, C, H, W)`` log-odds lengths of the class capsules."""

    def __init__(self, in_channels: int, classes: int, atoms: Sequence[int], types: int, act: LayerArg,
                 iterations: int) -> None:
        super().__init__()
        self.stem = Convolution(2, in_channels, atoms[0], kernel_size=5, act=act, norm=None)
        levels = [(1, atoms[0])] + [(types, a) for a in atoms[1:]]
        self.encoder = nn.ModuleList()
        for i in range(1, len(atoms)):
            self.encoder.append(nn.ModuleList([
                # SegCaps routes its primary capsules (the first capsule layer) once.
                ConvCapsules(*levels[i - 1], *levels[i], stride=2, iterations=1 if i == 1 else iterations),
                ConvCapsules(*levels[i], *levels[i], iterations=iterations),
            ]))
        self.decoder = nn.ModuleList()
        for i in range(len(atoms) - 1, 0, -1):
            up_types = types if i > 1 else 2  # SegCaps' last transposed layer has 2 types
            merged = up_types + levels[i - 1][0]
            out = (types, atoms[i - 1]) if i > 1 else (classes, atoms[0])
            self.decoder.append(nn.ModuleList([
                ConvCapsules(*levels[i], up_types, atoms[i - 1], up=True, iterations=iterations),
                ConvCapsules(merged, atoms[i - 1], *out, iterations=iterations),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        caps = self.stem(x).unsqueeze(1)
        skips = [caps]
        for down, same in self.encoder:
            caps = same(down(caps)[0])[0]
            skips.append(caps)
        skips.pop()
        s = caps
        for up, merge in self.decoder:
            caps = torch.cat([up(caps)[0], skips.pop()], dim=1)
            caps, s = merge(caps)
        return length_logits(s, dim=2)


def build_segcaps(
    spatial_dims: int, in_channels: int, out_channels: int, *, channels: Sequence[int] | None = None,
    depth: int | None = None, base_channels: int | None = None, act: LayerArg | None = None,
    capsule_types: int = 4, routing_iterations: int = ROUTING_ITERATIONS,
) -> SegCaps:
    """Build ``segcaps`` (2D; defaults: atoms 16, 32, 64 per level, 4 types). Sizes must divide by ``2**depth``."""
    _require_2d("segcaps", spatial_dims)
    widths = resolve_channels("segcaps", channels, depth, base_channels, default_depth=2, default_base=16)
    if len(widths) < 2:
        raise ValueError(f"Model 'segcaps': needs depth >= 1 (at least 2 widths), got {list(widths)}.")
    _check_positive("segcaps", capsule_types=capsule_types, routing_iterations=routing_iterations)
    return SegCaps(in_channels, out_channels, widths, capsule_types, resolve_act("segcaps", act) or "relu",
                   routing_iterations)


def segcaps_encoder(net: nn.Module) -> list[nn.Module]:
    """The stem convolution and the down-sampling capsule layers."""
    return [net.stem, net.encoder]


_NO_NORM = "capsule networks have no normalisation layers: the squash bounds every capsule's length."
_NO_DROPOUT = "dropping pose components would change the capsule lengths that are the class scores."

MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="capsnet",
        task="classification",
        builder=build_capsnet,
        encoder=capsnet_encoder,
        unsupported={"norm": _NO_NORM, "dropout": _NO_DROPOUT},
        description="CapsNet (Sabour et al. 2017): primary capsules, dynamic routing to class capsules (2D).",
        dims=(2,),
    ),
    ModelSpec(
        name="segcaps",
        task="segmentation",
        builder=build_segcaps,
        encoder=segcaps_encoder,
        unsupported={"norm": _NO_NORM, "dropout": _NO_DROPOUT},
        description="SegCaps (LaLonde & Bagci 2018): U-shaped convolutional capsules, local routing (2D).",
        dims=(2,),
    ),
)
