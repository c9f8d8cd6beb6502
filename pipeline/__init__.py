"""A reproducible, distributed DCGAN training pipeline (DVC + WebDataset + Ray Train + MLflow)."""
