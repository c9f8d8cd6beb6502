"""Operations outside the DAG: `python -m pipeline promote|sample|compare|import-run|sync-run`.

Each command talks to the MLflow store named by --tracking-uri (default: `mlflow.tracking_uri`
of params.yaml, see `pipeline.core.tracking.resolve_tracking_uri`); an unreachable server is a
one-line error before any work. Failures a user can fix exit 1 with one line.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from pipeline.cli.stage import run_stage
from pipeline.core.config import PARAMS_FILE, Config, load_config
from pipeline.core.errors import UserError
from pipeline.core.tracking import check_reachable, resolve_tracking_uri

log = logging.getLogger(__name__)


def _params(args: argparse.Namespace) -> Config:
    # Outside the repository (no params.yaml) the built-ins, which are params.yaml's defaults.
    path = Path(args.params)
    if path.exists():
        return load_config(path)
    log.info("no %s here: using the built-in defaults (those of the repository's params.yaml)",
             path)
    return Config()


def _tracking_uri(args: argparse.Namespace) -> str:
    """The store to use, checked before the slow MLflow import: a dead server fails at once."""
    root = Path(args.params).resolve().parent
    uri = args.tracking_uri or resolve_tracking_uri(_params(args).mlflow, root)
    check_reachable(uri)
    return uri


# Handlers import MLflow/torch late, after the tracking URI was checked (and --help stays fast).
def _promote(args: argparse.Namespace, tracking_uri: str) -> None:
    from pipeline.registry.promote import promote
    from pipeline.registry.register import open_registry

    cfg = _params(args)
    client = open_registry(tracking_uri)
    decision = promote(
        client,
        args.name or cfg.register.model_name,
        version=args.version,
        alias=args.alias,
        metric=args.metric,
        force=args.force,
        source_alias=args.from_alias or cfg.register.alias,
    )
    print(
        f"{decision.name} version {decision.version} holds {decision.alias!r} "
        f"({decision.metric}={decision.value}; previous: version {decision.previous_version}, "
        f"{decision.metric}={decision.previous_value}): {decision.reason}"
    )


def _sample(args: argparse.Namespace, tracking_uri: str) -> None:
    from pipeline.registry.register import open_registry
    from pipeline.registry.sampling import sample_to_file

    open_registry(tracking_uri)
    fmt = args.format or ("npy" if args.out.suffix == ".npy" else "png")
    out = sample_to_file(args.model, args.n, args.seed, args.out, fmt)
    print(f"wrote {out}")


def _compare(args: argparse.Namespace, tracking_uri: str) -> None:
    from pipeline.registry.compare import RunSelection, compare_runs, parse_tag_filters
    from pipeline.registry.register import open_registry

    selection = RunSelection(run_ids=args.runs, dvc_experiments=args.dvc_exp,
                             tags=parse_tag_filters(args.tag))
    client = open_registry(tracking_uri)
    table = compare_runs(
        client,
        args.experiment or _params(args).mlflow.experiment,
        selection,
        args.out,
        args.table,
        samples_per_run=args.samples,
        seed=args.seed,
    )
    print(table.to_string(index=False))
    print(f"wrote {args.out}" + (f" and {args.table}" if args.table else ""))


def _import_run(args: argparse.Namespace, tracking_uri: str) -> None:
    from pipeline.core.layout import Layout
    from pipeline.registry.import_run import import_run

    if bool(args.run_id) == bool(args.job):
        raise UserError("give a run id or --job SUBMISSION_ID (one of the two)")
    layout = Layout(Path(args.params).resolve().parent)
    done = import_run(layout, tracking_uri, args.run_id, args.job, commit=not args.no_dvc_commit)
    run = done.train_run
    job = f", job {run.ray_job_submission_id}" if run.ray_job_submission_id else ""
    print(f"imported run {done.run_id} ({run.steps} steps on {run.world_size} worker(s){job}; "
          f"generator SHA-256 {run.generator_sha256[:12]} checked) from {tracking_uri}:")
    for path in done.files:
        print(f"  {path.relative_to(layout.root)}")
    for key, (was, now) in done.params_changed.items():
        print(f"params.yaml: {key}: {was!r} -> {now!r} (what the run trained with)")
    for key, (here, theirs) in done.params_kept.items():
        print(f"params.yaml: {key}: kept {here!r} (the cluster's was {theirs!r}; the data is the "
              "same, checked by hash)")
    if done.dvc_committed:
        print("dvc.lock: the train stage records these outputs and params; `dvc repro` goes on "
              "with evaluate and register without training")
    else:
        print("not recorded in dvc.lock (--no-dvc-commit): `dvc commit --force train` does it")


def _sync_run(args: argparse.Namespace, tracking_uri: str) -> None:
    from pipeline.core.layout import Layout
    from pipeline.train.train import sync_run

    layout = Layout(Path(args.params).resolve().parent)
    print(sync_run(_params(args), layout, tracking_uri, args.run_id))


def build_parser() -> argparse.ArgumentParser:
    """The `python -m pipeline` parser with its sub-commands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--tracking-uri",
        default="",
        help="MLflow tracking/registry URI (sqlite:///file.db or http://host:port); "
        "default: mlflow.tracking_uri of --params, or MLFLOW_TRACKING_URI",
    )
    common.add_argument("--params", default=str(PARAMS_FILE), help="params file for defaults")

    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    promote = commands.add_parser(
        "promote",
        parents=[common],
        help="move an alias (champion) to a version that beats its holder",
        description="Move ALIAS to a version only if it beats the current holder on METRIC "
        "computed with the same feature extractor and N; otherwise exit 1 saying why. "
        "--version of an older version is a rollback. Decisions are recorded as tags.",
    )
    promote.add_argument(
        "--name", default="", help="registered model (default: register.model_name)"
    )
    promote.add_argument(
        "--version",
        default=None,
        help="version to promote (default: the holder of --from-alias, else the newest)",
    )
    promote.add_argument("--alias", default="champion", help="alias to move (default: %(default)s)")
    promote.add_argument(
        "--from-alias", default="", help="default version's alias (default: register.alias)"
    )
    promote.add_argument(
        "--metric",
        default=None,
        help="metric to compare (default: fid_inception if evaluated, else fid_classifier)",
    )
    promote.add_argument("--force", action="store_true", help="move the alias even if worse")
    promote.set_defaults(handler=_promote)

    sample = commands.add_parser(
        "sample",
        parents=[common],
        help="generate images from a registered or logged generator",
        description="Generate N images from MODEL with noise SEED: a grid PNG or an .npy array "
        "(N, C, H, W) float32 in [-1, 1].",
    )
    sample.add_argument(
        "--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, ..."
    )
    sample.add_argument("--n", type=int, default=64, help="number of images (default: %(default)s)")
    sample.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    sample.add_argument("--out", type=Path, required=True, help="output file")
    sample.add_argument(
        "--format",
        choices=("png", "npy"),
        default=None,
        help="png grid or npy array (default: from --out's suffix, else png)",
    )
    sample.set_defaults(handler=_sample)

    compare = commands.add_parser(
        "compare",
        parents=[common],
        help="compare runs: differing params, key metrics, samples from the same noise",
        description="Write one image with each run's sample grid side by side, all from the "
        "same fixed noise, and a table of the runs' differing params and key metrics. Runs: "
        "--runs ids, or --dvc-exp names (e.g. a sweep: `dvc exp show` names them), else every "
        "run of the experiment; --tag narrows either.",
    )
    compare.add_argument("--experiment", default="", help="experiment (default: mlflow.experiment)")
    which = compare.add_mutually_exclusive_group()
    which.add_argument(
        "--runs",
        nargs="*",
        default=[],
        help="run ids (default: every run of the experiment with a logged generator)",
    )
    which.add_argument(
        "--dvc-exp",
        nargs="+",
        default=[],
        metavar="NAME",
        help="DVC experiment names: the runs tagged dvc.exp_name=NAME, in this order",
    )
    compare.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only runs with this tag (repeatable), e.g. dvc.baseline_rev=<commit> for every "
        "experiment queued on that commit",
    )
    compare.add_argument("--out", type=Path, required=True, help="side-by-side PNG")
    compare.add_argument("--table", type=Path, default=None, help="table file: .csv or .md")
    compare.add_argument(
        "--samples", type=int, default=16, help="images per run (default: %(default)s)"
    )
    compare.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    compare.set_defaults(handler=_compare)

    imports = commands.add_parser(
        "import-run",
        parents=[common],
        help="bring a train run's outputs (e.g. of `ray job submit`) into the workspace and "
        "dvc.lock",
        description="Fetch a finished train run's generator, records, log and grids from the "
        "tracking store into models/ and reports/, check them by SHA-256 and the data by its "
        "hash, set params.yaml's train-stage keys to the run's (except train.shards and "
        "train.storage_path), and record it all with `dvc commit --force train`: `dvc repro` "
        "then runs evaluate and register without training again.",
    )
    imports.add_argument("run_id", nargs="?", default="", help="the MLflow run id")
    imports.add_argument(
        "--job", default="", help="instead of a run id: the `ray job submit` submission id"
    )
    imports.add_argument(
        "--no-dvc-commit", action="store_true", help="fetch and check only; leave dvc.lock"
    )
    imports.set_defaults(handler=_import_run)

    sync = commands.add_parser(
        "sync-run",
        parents=[common],
        help="upload what a train run could not log while its tracking server was away",
        description="Log the metric rows and grids that a train run kept in its storage "
        "(<train.storage_path>/<ray run>/unlogged/) while the MLflow server did not answer, "
        "the stage outputs when this workspace holds that run's, and mark it FINISHED. Each "
        "file is removed once logged: running it twice logs nothing twice.",
    )
    sync.add_argument("run_id", help="the MLflow run id (the train stage's warning names it)")
    sync.set_defaults(handler=_sync_run)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Parse `argv` and run the chosen command; user errors exit 1 (params: 2) with one line."""
    args = build_parser().parse_args(argv)
    run_stage(lambda: args.handler(args, _tracking_uri(args)))
