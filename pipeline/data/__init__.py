"""Images in and out.

`sources`: where images come from (mnist5k, a folder, an archive). `images`: one source image
to its stored form. `prepare`: the `prepare` stage (deterministic WebDataset shards, manifest,
stats). `reader`: reading one shard safely. `loader`: training batches and in-order passes
over shards. `cache`: a decoded split kept in memory. `pixels`: stored uint8 <-> model
floats. `grids`: image grids as PNG."""
