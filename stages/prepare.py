"""DVC stage `prepare`: images (mnist5k, a directory or an archive) -> WebDataset shards.

Writes data/shards/{train,val}-NNNNNN.tar, data/manifest.parquet, data/stats.json and
metrics/prepare.json.
Usage: python stages/prepare.py [-S data.source=path/to/images] [-S data.image_size=64]
"""

from pipeline.cli.stage import parse_stage_config, run_stage
from pipeline.data import prepare


def main() -> None:
    cfg, layout = parse_stage_config(__doc__.splitlines()[0])
    run_stage(lambda: prepare.run(cfg, layout))


# The guard matters: the decode pool uses spawn, which re-imports this file.
if __name__ == "__main__":
    main()
