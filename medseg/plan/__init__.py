"""`medseg plan`: a dataset fingerprint, the rules that turn it into a training configuration, and the writer of
that configuration as a commented YAML file."""
