"""The ROC-AUC logged during training, computed by the same code as ``medseg evaluate``.

:class:`ExactAUROC` keeps every probability and label of the epoch (concatenated across DDP processes, whatever
number of cases each holds) and calls :func:`medseg.metrics.classification.roc_auc` once at the end: exact
Mann-Whitney AUC with ties counted one half; ``K == 2`` is the AUC of class 1's probability; for ``K > 2`` a class
absent from the epoch's labels has no AUC and is left out of the macro mean (torchmetrics' ``MulticlassAUROC``
counts it as 0 instead).
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from medseg.metrics.classification import roc_auc


class ExactAUROC(Metric):
    """Macro ROC-AUC of ``(N, K)`` probabilities, as :func:`~medseg.metrics.classification.roc_auc` gives it.

    Args:
        num_classes: ``K`` (at least 2).
        **kwargs: :class:`torchmetrics.Metric` options.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.add_state("probabilities", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, probabilities: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``probabilities`` ``(B, K)`` (rows summing to 1) and ``target`` ``(B,)`` class indices."""
        if probabilities.ndim != 2 or probabilities.shape[1] != self.num_classes:
            raise ValueError(f"probabilities must be (B, {self.num_classes}), got {tuple(probabilities.shape)}")
        if not probabilities.is_floating_point():
            raise ValueError(f"probabilities must be floating point, got {probabilities.dtype}")
        if target.shape != probabilities.shape[:1]:
            raise ValueError(f"target {tuple(target.shape)} does not match {probabilities.shape[0]} rows")
        self.probabilities.append(probabilities.detach())
        self.target.append(target.detach().long())

    def compute(self) -> torch.Tensor:
        """The macro AUC as a float32 scalar; NaN when no class has both positives and negatives."""
        if isinstance(self.target, list) and not self.target:
            return torch.tensor(float("nan"), device=self.device)
        probabilities = dim_zero_cat(self.probabilities).double().cpu().numpy()
        target = dim_zero_cat(self.target).cpu().numpy()
        macro, _ = roc_auc(target, probabilities)
        return torch.tensor(macro, dtype=torch.float32, device=self.device)
