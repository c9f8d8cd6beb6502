"""DVC stage `register`: the evaluated generator -> MLflow model registry, alias `candidate`.

Logs the generator (a models-from-code pyfunc, see pipeline/registry/package.py) into the
training run, registers it as `register.model_name` with its evaluation scores and lineage as
version tags, sets `register.alias`, and writes reports/registry.json. Re-running for the same
weights creates no new version.
Usage: python stages/register.py [-S register.model_name=my-gan] [-S mlflow.tracking_uri=...]
"""

from pipeline.cli.stage import parse_stage_config, run_stage
from pipeline.registry import register


def main() -> None:
    cfg, layout = parse_stage_config(__doc__.splitlines()[0])
    run_stage(lambda: print(register.run(cfg, layout)))


if __name__ == "__main__":
    main()
