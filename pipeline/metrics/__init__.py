"""Sample quality, shared by training (quality while it trains) and the evaluate stage:
feature extractors, cached real features, FID/KID and class coverage."""
