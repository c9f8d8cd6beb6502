"""DVC stage `prepare`: images (mnist5k, a directory or an archive) -> WebDataset shards.

Writes data/shards/{train,val}-NNNNNN.tar, data/manifest.parquet and data/stats.json.
Usage: python stages/prepare.py [-S data.source=path/to/images] [-S data.image_size=64]
"""

from pipeline.cli import parse_stage_config, run_stage
from pipeline.sharding import prepare_dataset


def main() -> None:
    cfg = parse_stage_config(__doc__.splitlines()[0])
    run_stage(lambda: prepare_dataset(cfg.data))


# The guard matters: the decode pool uses spawn, which re-imports this file.
if __name__ == "__main__":
    main()
