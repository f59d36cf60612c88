"""Stable A/B assignment: which served model (arm) answers a request.

A request goes to arm B when the SHA-256 of its key (the patient id, else the case id the client gave as a form
field or header, else the request id; a case id taken from the file name routes nothing, since every client's
``image.nii.gz`` would meet the same arm)
read as a fraction of 2**64 falls below the split ``P``. The hash does not depend on the process (unlike
Python's ``hash``), so one patient meets the same model on every request and across restarts, and over many
keys the share of arm B is ``P``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


def key_fraction(key: str) -> float:
    """``key``'s place in ``[0, 1)``: the first 8 bytes of its UTF-8 SHA-256, divided by 2**64."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def routing_key(patient: str | None, case: str | None, request: str) -> str:
    """What decides the arm: the patient id, else the case id the client gave (not one taken from the file
    name), else the (random) request id."""
    return patient or case or request


@dataclass(frozen=True)
class Arm:
    """One served model and its share of the requests.

    Attributes:
        label: ``"A"`` or ``"B"``.
        name: the model's name as reported (``/models``, the log's ``model`` column, the metrics).
        model: the loaded model (:class:`medseg.api.Model` or an object with its interface).
        share: the fraction of keys routed to it.
    """

    label: str
    name: str
    model: Any
    share: float


class Router:
    """One model (every request) or two (arm B for the keys below ``split``)."""

    def __init__(self, models: Sequence[Any], split: float = 0.5) -> None:
        if not 1 <= len(models) <= 2:
            raise ValueError(f"serve one model or two (an A/B test), not {len(models)}")
        if not 0.0 <= split <= 1.0:
            raise ValueError(f"--split {split}: the share of arm B must lie in [0, 1]")
        self.split = split if len(models) == 2 else 0.0
        names = unique_names([str(model.name) for model in models])
        shares = [1.0 - self.split, self.split][: len(models)] if len(models) == 2 else [1.0]
        self.arms = [Arm(label, name, model, share)
                     for label, name, model, share in zip("AB", names, models, shares, strict=False)]

    def choose(self, key: str) -> Arm:
        """The arm that serves ``key``."""
        if len(self.arms) == 2 and key_fraction(key) < self.split:
            return self.arms[1]
        return self.arms[0]


def unique_names(names: Sequence[str]) -> list[str]:
    """``names`` with a repeated name suffixed ``-B`` (two exports of one model served as an A/B test)."""
    if len(names) == 2 and names[0] == names[1]:
        return [names[0], f"{names[1]}-B"]
    return list(names)
