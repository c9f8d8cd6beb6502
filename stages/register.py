"""DVC stage `register`: the evaluated generator -> MLflow model registry, alias `candidate`.

Logs the generator (a models-from-code pyfunc, see pipeline/registry.py) into the training run,
registers it as `register.model_name` with every evaluation metric, param and hash as version
tags, sets `register.alias`, and writes reports/registry.json. Re-running for the same weights
creates no new version.
Usage: python stages/register.py [-S register.model_name=my-gan] [-S mlflow.tracking_uri=...]
"""

from pipeline.cli import parse_stage_config, run_stage
from pipeline.registry import register_generator
from pipeline.tracking import resolve_tracking_uri


def main() -> None:
    cfg = parse_stage_config(__doc__.splitlines()[0])
    run_stage(lambda: print(register_generator(cfg, resolve_tracking_uri(cfg.mlflow))))


if __name__ == "__main__":
    main()
