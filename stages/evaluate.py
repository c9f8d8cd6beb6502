"""DVC stage `evaluate`: FID/KID (with the real-vs-real floor), class coverage and grids.

Generates eval.num_samples images from models/generator.pt, measures them against the real
train split with the extractor eval.feature_extractor picks (auto: Inception weights if present,
else the domain classifier), writes reports/evaluation.json, metrics/evaluate.json,
samples.png, interpolation.png and reals.png, and logs everything to the training's MLflow run.
Usage: python stages/evaluate.py [-S eval.num_samples=1000] [-S eval.feature_extractor=inception]
"""

from pipeline.cli.stage import parse_stage_config, run_stage
from pipeline.evaluate import evaluate


def main() -> None:
    cfg, layout = parse_stage_config(__doc__.splitlines()[0])
    run_stage(lambda: evaluate.run(cfg, layout))


if __name__ == "__main__":
    main()
