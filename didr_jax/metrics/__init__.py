"""Evaluation metrics (FID) computed outside the training loop."""
