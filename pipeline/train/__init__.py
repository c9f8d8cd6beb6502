"""Distributed DCGAN training: the loop of one rank, SyncBatchNorm, checkpoints, preflight,
fault injection and the Ray Train adapter (the one module that imports ray.train)."""
