"""Images in and out: sources, image preparation, shard writing (prepare), shard reading,
the training loaders and image grids."""
