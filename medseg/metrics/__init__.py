"""Metrics per case that agree with the references (MONAI for segmentation, scikit-learn for classification)."""
