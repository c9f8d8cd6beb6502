"""DVC stage `featurize`: train the domain classifier used as the FID feature extractor.

Trains a small CNN on the labelled train shards, checks it on val (>= featurize.min_val_accuracy)
and writes models/classifier/{weights.pt,spec.json} and reports/featurize.json. For unlabelled
data it writes only spec.json saying why (evaluate then uses Inception weights, if present).
Usage: python stages/featurize.py [-S featurize.epochs=6]
"""

from pipeline.classifier import featurize
from pipeline.cli import parse_stage_config, run_stage


def main() -> None:
    cfg = parse_stage_config(__doc__.splitlines()[0])
    run_stage(lambda: featurize(cfg))


if __name__ == "__main__":
    main()
