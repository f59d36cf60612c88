"""medseg: medical image segmentation and classification on PyTorch Lightning and MONAI."""

__version__ = "0.1.0"


def load(source, device="auto", runtime="auto", **options):  # noqa: ANN001, ANN003, ANN201
    """``medseg.load(folder or checkpoint)``: a model ready to ``predict`` (see :func:`medseg.api.load`).

    Imported on first use, so ``import medseg`` stays light (no torch, MONAI or Lightning).
    """
    from medseg.api import load as _load

    return _load(source, device, runtime, **options)
