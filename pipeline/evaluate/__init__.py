"""Measuring a generator: the domain classifier stage, feature extractors, FID/KID and class
coverage, and the evaluate stage."""
