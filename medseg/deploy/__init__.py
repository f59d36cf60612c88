"""Shipping a trained model: the exported folder (networks, spec, MONAI bundle) and loading it back."""
