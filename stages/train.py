"""DVC stage `train`: DCGAN on Ray Train (DDP + SyncBatchNorm), tracked in MLflow.

Reads data/shards + data/stats.json; writes models/generator.pt, models/generator.json,
reports/train_run.json, metrics/train.json, reports/train_log.csv and
reports/train_grids/epoch_NNN.png. Connects to the Ray cluster of RAY_ADDRESS / `ray job
submit`, else starts Ray locally.
Usage: python stages/train.py [-S train.epochs=2] [-S train.num_workers=1]
"""

from pipeline.cli.stage import parse_stage_config, run_stage
from pipeline.train import train


def main() -> None:
    cfg, layout = parse_stage_config(__doc__.splitlines()[0])
    run_stage(lambda: train.run(cfg, layout))


if __name__ == "__main__":
    main()
