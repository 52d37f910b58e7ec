"""cmfl-flower: cross-modality federated learning with diffusion models."""
