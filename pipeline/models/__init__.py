"""The networks: the DCGAN generator and discriminator, the domain classifier and the FID
Inception v3. Plain torch modules; no files beyond their own weights."""
