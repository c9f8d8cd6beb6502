"""The networks; plain torch modules, no files beyond their own weights.

`dcgan`: the DCGAN generator and discriminator. `classifier`: the domain classifier.
`inception`: the FID Inception v3."""
