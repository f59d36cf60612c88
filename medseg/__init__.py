"""medseg: medical image segmentation and classification on PyTorch Lightning and MONAI."""

__version__ = "0.1.0"
