"""Model state across layouts: meta-device materialization, distributed checkpoints, unsharding."""
