"""Helpers for tests and benchmarks (local gloo ranks, free ports): not part of the product."""
