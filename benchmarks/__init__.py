"""Throughput and scaling benchmarks of the pipeline against a plain PyTorch reference loop.

Not tests: nothing here asserts a time. Run `python -m benchmarks.run_all [--quick]` from the
repository root; BENCHMARKS.md holds the figures, the commands and the machine.
"""
