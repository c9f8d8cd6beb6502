"""DVC stage `classifier`: train the domain classifier, FID's feature extractor.

Trains a small CNN on the labelled train shards, checks it on val (>= classifier.min_val_accuracy)
and writes models/classifier/{weights.pt,spec.json} and metrics/classifier.json. For
unlabelled data it writes only spec.json saying why (evaluate then uses Inception weights, if
present).
Usage: python stages/classifier.py [-S classifier.epochs=6]
"""

from pipeline.cli.stage import parse_stage_config, run_stage
from pipeline.evaluate import classifier


def main() -> None:
    cfg, layout = parse_stage_config(__doc__.splitlines()[0])
    run_stage(lambda: classifier.run(cfg, layout))


if __name__ == "__main__":
    main()
