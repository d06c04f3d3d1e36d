"""Training pipeline for the grounded CT-language model (see docs/training.md)."""
