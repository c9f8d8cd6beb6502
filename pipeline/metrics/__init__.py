"""Sample quality, shared by training (quality while it trains) and the evaluate stage.

`features`: the feature extractors behind one interface (Inception, the domain classifier).
`distances`: FID, KID, classifier score and class coverage from features. `probe`: the
in-training quality check on a fixed batch of samples."""
