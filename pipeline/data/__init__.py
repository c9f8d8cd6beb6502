"""Images in and out.

`sources`: where images come from (mnist5k, a folder, an archive, a manifest). `images`: one
source image to its stored form. `prepare`: the `prepare` stage (deterministic WebDataset
shards, manifest, stats), streaming; `shard_writer`: one shard's task (decode, write,
summarise); `ray_prepare`: those tasks on a Ray cluster. `reader`: reading one shard safely.
`loader`: training batches and in-order passes over shards. `cache`: a decoded split kept in
memory. `pixels`: stored uint8 <-> model floats. `grids`: image grids as PNG."""
