"""The MLflow model registry side: packaging the generator, register, promote, compare runs
and sample from registered models."""
