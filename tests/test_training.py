"""The trainer: DDP maths, NaN stop, real Ray Train runs (2 workers with a crash, exact resume),
MLflow written by rank 0 only, and the preflight errors."""

from __future__ import annotations

import copy
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from devtools.gloo import run_gloo_ranks
from pipeline.core.config import Config, load_config
from pipeline.core.errors import UserError
from pipeline.core.layout import Layout
from pipeline.core.records import TrainRun
from pipeline.models.dcgan import Generator, GeneratorSpec, build_generator
from pipeline.train import checkpoints, shm_allreduce
from pipeline.train import loop as training
from pipeline.train.collectives import no_forward_buffer_sync

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.nz=16", "model.ngf=8", "model.ndf=8", "train.log_every_steps=10",
        "train.loader_workers=0"]


def tiny_config(**overrides: object) -> Config:
    settings = [*TINY, *(f"{key}={value}" for key, value in overrides.items())]
    return load_config(REPO_ROOT / "params.yaml", settings)


class LocalHooks:
    """`training.LoopHooks` without Ray: checkpoints kept in memory (the loop wraps for DDP)."""

    def __init__(self) -> None:
        self.saved: list[dict] = []
        self.quality: list[dict] = []

    def before_step(self, step):
        pass

    def save_checkpoint(self, state, metrics):
        # Persist now, as Ray does: the live tensors keep training.
        self.saved.append({"state": copy.deepcopy(state), "metrics": metrics})

    def log_rows(self, rows):
        pass

    def log_quality(self, rows):
        self.quality.extend(rows)

    def publish_grid(self, epoch, step, images):
        pass


# --- the loop without Ray -----------------------------------------------------------------------


def _steps_on_ranks(rank: int, world_size: int, real: torch.Tensor, noise: torch.Tensor,
                    cpu_allreduce: str = "auto") -> dict:
    """Run `len(real)` DCGAN steps; this rank takes its slice of every global batch."""
    torch.set_num_threads(1)
    per_rank = real.shape[1] // world_size
    cfg = tiny_config(**{"data.image_size": 16, "train.batch_size": per_rank,
                         "train.cpu_allreduce": cpu_allreduce})
    env = training.LoopEnv(rank, world_size, torch.device("cpu"), steps_per_epoch=10)
    loop = training.TrainLoop(cfg, env, LocalHooks())
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    for step_real, step_noise in zip(real, noise, strict=True):
        loop.train_step(step_real[mine], step_noise[mine])
    return {
        "g": {k: v.clone() for k, v in training.unwrap(loop.generator).state_dict().items()},
        "d": {k: v.clone() for k, v in training.unwrap(loop.discriminator).state_dict().items()},
        "shared_memory": world_size > 1 and shm_allreduce.channel_for() is not None,
    }


def test_two_ddp_ranks_take_the_steps_of_one_process_with_the_global_batch():
    """SyncBatchNorm + DDP (two D forwards per backward, D skipped in G's all-reduce): two ranks
    with 4 images each end where one process with those 8 images ends."""
    generator = torch.Generator().manual_seed(1)
    real = torch.rand(2, 8, 1, 16, 16, generator=generator) * 2 - 1
    noise = torch.randn(2, 8, 16, generator=generator)
    rank0, rank1 = run_gloo_ranks(_steps_on_ranks, 2, (real, noise))
    single = _steps_on_ranks(0, 1, real, noise)
    for part in ("g", "d"):
        for key, expected in single[part].items():
            assert torch.equal(rank0[part][key], rank1[part][key]), f"{part}.{key} differs by rank"
            torch.testing.assert_close(
                rank0[part][key].double(), expected.double(), rtol=1e-4, atol=1e-6,
                msg=lambda m, k=f"{part}.{key}": f"{k}: {m}",
            )


def test_cpu_allreduce_gloo_is_the_operators_fallback_and_trains_the_same():
    """`train.cpu_allreduce=gloo` turns the shared-memory all-reduce off on every rank; for two
    ranks both sum a + b in float32, so the weights are the same bits."""
    generator = torch.Generator().manual_seed(2)
    real = torch.rand(2, 8, 1, 16, 16, generator=generator) * 2 - 1
    noise = torch.randn(2, 8, 16, generator=generator)
    shared, _ = run_gloo_ranks(_steps_on_ranks, 2, (real, noise, "auto"))
    gloo, _ = run_gloo_ranks(_steps_on_ranks, 2, (real, noise, "gloo"))
    assert shared["shared_memory"] and not gloo["shared_memory"]
    for part in ("g", "d"):
        for key, expected in shared[part].items():
            assert torch.equal(gloo[part][key], expected), f"{part}.{key}"


# --- the bucketed gradient all-reduce (the multi-GPU captured step's) vs DDP ---------------------

EQUIVALENCE_STEPS = 6  # with R1 every 2nd step: D's R1 gradients are averaged too


class StopBeforeError(Exception):
    """An interruption a test injects before a step."""


class StoppingHooks(LocalHooks):
    """LocalHooks that interrupt the run before step `stop_before` (0: never)."""

    def __init__(self, stop_before: int) -> None:
        super().__init__()
        self.stop_before = stop_before

    def before_step(self, step):
        if step == self.stop_before:
            raise StopBeforeError(step)


def _trained_on_ranks(rank: int, world_size: int, pool: torch.Tensor, gradients: str,
                      cpu_allreduce: str, checkpoint_every: int = EQUIVALENCE_STEPS,
                      stop_before: int = 0, state_file: str = "") -> dict:
    """`TrainLoop.run` over `pool` (one global batch per step, this rank's rows) with
    `train.gradient_allreduce=gradients`, interrupted before step `stop_before` (rank 0 then
    writes the last checkpoint to `state_file`), or resumed from `state_file` on every rank."""
    torch.set_num_threads(1)
    per_rank = pool.shape[1] // world_size
    cfg = tiny_config(**{
        "data.image_size": 16, "train.batch_size": per_rank, "train.epochs": 1,
        "train.gradient_allreduce": gradients, "train.cpu_allreduce": cpu_allreduce,
        "train.r1_every_steps": 2, "train.augment": "adaptive", "train.ada_every_steps": 1,
        "train.checkpoint_every_steps": checkpoint_every, "train.ema_half_life_images": 100,
    })
    state = checkpoints.load_state(state_file) if state_file and not stop_before else None
    hooks = StoppingHooks(stop_before)
    env = training.LoopEnv(rank, world_size, torch.device("cpu"), EQUIVALENCE_STEPS)
    loop = training.TrainLoop(cfg, env, hooks, state)
    mine = slice(rank * per_rank, (rank + 1) * per_rank)

    def source(epoch, skip):
        for index in range(skip, EQUIVALENCE_STEPS):
            yield pool[index, mine], None

    try:
        steps = loop.run(source).steps
    except StopBeforeError:
        steps = loop.step
        if rank == 0:
            checkpoints.save_state(hooks.saved[-1]["state"], state_file)
    return {
        "mode": loop.gradient_allreduce.mode,
        "wrapped": isinstance(loop.generator, torch.nn.parallel.DistributedDataParallel),
        "digest": training.param_sha256(loop.generator, loop.discriminator),
        "losses": [(row["loss_d"], row["loss_g"]) for row in loop.log_rows],
        "g": {k: v.clone() for k, v in training.unwrap(loop.generator).state_dict().items()},
        "d": {k: v.clone() for k, v in training.unwrap(loop.discriminator).state_dict().items()},
        "steps": steps,
    }


def _pool(world_size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (EQUIVALENCE_STEPS, 4 * world_size, 1, 16, 16),
                         generator=generator, dtype=torch.uint8)


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_the_bucketed_all_reduce_trains_as_ddp_does(world_size):
    """The multi-GPU captured step's gradient average (no DDP wrapper), run over gloo on CPU
    ranks: the same losses and the same weights as DDP after steps with G, D, R1 and ADA.
    Through shared memory both sum in rank order: the same bits at any world size. Over
    gloo's TCP, two ranks add a + b either way (the same bits); three may add in another
    order than DDP's buckets do, so to float32 rounding."""
    pool = _pool(world_size, seed=world_size)
    for cpu_allreduce in ("auto", "gloo"):
        ddp = run_gloo_ranks(_trained_on_ranks, world_size, (pool, "ddp", cpu_allreduce),
                             timeout_s=120)
        bucketed = run_gloo_ranks(_trained_on_ranks, world_size,
                                  (pool, "bucketed", cpu_allreduce), timeout_s=120)
        assert [r["mode"] for r in ddp + bucketed] == ["ddp"] * world_size + [
            "bucketed"] * world_size
        assert ddp[0]["wrapped"] and not bucketed[0]["wrapped"]
        assert len({r["digest"] for r in bucketed}) == 1, "ranks differ"
        assert bucketed[0]["steps"] == EQUIVALENCE_STEPS
        exact = cpu_allreduce == "auto" or world_size == 2
        if exact:
            assert bucketed[0]["digest"] == ddp[0]["digest"], cpu_allreduce
            assert bucketed[0]["losses"] == ddp[0]["losses"]
            continue
        for part in ("g", "d"):
            for key, expected in ddp[0][part].items():
                torch.testing.assert_close(bucketed[0][part][key], expected, rtol=1e-4,
                                           atol=1e-6, msg=lambda m, k=f"{part}.{key}": f"{k}: {m}")
        for mine, theirs in zip(bucketed[0]["losses"], ddp[0]["losses"], strict=True):
            assert mine == pytest.approx(theirs, rel=1e-4)


@pytest.mark.slow
def test_a_bucketed_run_resumed_from_a_checkpoint_ends_bit_identical(tmp_path):
    """Three ranks, the bucketed all-reduce: interrupted before step 5 and resumed from the
    checkpoint of step 3 on every rank, the run ends with the uninterrupted run's weights."""
    pool, state_file = _pool(3, seed=7), str(tmp_path / "step3")
    straight = run_gloo_ranks(_trained_on_ranks, 3, (pool, "bucketed", "auto", 3),
                              timeout_s=120)
    stopped = run_gloo_ranks(_trained_on_ranks, 3, (pool, "bucketed", "auto", 3, 5, state_file),
                             timeout_s=120)
    assert [r["steps"] for r in stopped] == [4, 4, 4]  # checkpoint at 3, stopped before 5
    resumed = run_gloo_ranks(_trained_on_ranks, 3, (pool, "bucketed", "auto", 3, 0, state_file),
                             timeout_s=120)
    assert checkpoints.load_state(state_file)["step"] == 3
    assert {r["digest"] for r in resumed} == {straight[0]["digest"]}
    assert resumed[0]["losses"][-1] == straight[0]["losses"][-1]


def test_a_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint():
    cfg = tiny_config(**{"data.image_size": 16, "train.batch_size": 4,
                         "train.checkpoint_every_steps": 2, "train.log_every_steps": 1})
    hooks = LocalHooks()
    loop = training.TrainLoop(cfg, training.LoopEnv(0, 1, torch.device("cpu"), 10), hooks)

    def batches(epoch, skip):
        for index in range(skip, 10):
            images = torch.zeros(4, 1, 16, 16)
            yield (images.fill_(float("nan")) if index == 2 else images), None

    result = loop.run(batches)
    assert result.nonfinite_step == 3
    assert [saved["metrics"]["step"] for saved in hooks.saved] == [2]
    good = hooks.saved[0]["state"]
    assert all(torch.isfinite(t).all() for t in good["generator"].values())


def test_the_step_0_grid_shows_the_untrained_generator_and_leaves_it_untouched():
    torch.manual_seed(0)
    generator = build_generator(GeneratorSpec(16, 8, 32, 1))
    noise = torch.randn(64, 16)
    state = {key: value.clone() for key, value in generator.state_dict().items()}
    rng = torch.get_rng_state()
    samples = training.untrained_samples(generator, noise)
    assert samples.shape == (64, 1, 32, 32)
    with torch.no_grad():
        flat = generator.eval()(noise)
    # With its initial running statistics the generator draws a flat grey; with the batch's,
    # as in training, something a person can see.
    assert flat.std() < 1e-3 < 0.03 < samples.std()
    assert all(torch.equal(value, generator.state_dict()[key]) for key, value in state.items())
    assert torch.equal(rng, torch.get_rng_state())


# --- real Ray Train runs ------------------------------------------------------------------------


def ray_config(mnist_shards: Path, tmp_path: Path, **overrides: object) -> Config:
    cfg = tiny_config(**{
        "train.cpus_per_worker": 1,  # the test cluster has 4 logical CPUs on 2 cores
        "train.shards": str(mnist_shards / "data" / "shards"),
        "train.storage_path": str(tmp_path / "ray_storage"),
        "mlflow.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        **overrides,
    })
    return cfg


def layout_with_stats(mnist_shards: Path, out: Path) -> Layout:
    """A workspace at `out` holding only mnist5k's data/stats.json (shards: train.shards)."""
    layout = Layout(out)
    layout.stats.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(mnist_shards / "data" / "stats.json", layout.stats)
    return layout


def run_stage(cfg: Config, mnist_shards: Path, out: Path, fault: str = "",
              classifier_from: Path | None = None) -> dict:
    """The train stage in `out`; with the domain classifier of `classifier_from` (a repo where
    the classifier stage ran), quality is measured while training."""
    from pipeline.train import train
    from pipeline.train.faults import FAULT_ENV

    layout = layout_with_stats(mnist_shards, out)
    if classifier_from is not None:
        shutil.copytree(Layout(classifier_from).classifier_dir, layout.classifier_dir)
    if fault:
        os.environ[FAULT_ENV] = fault
    try:
        return train.run(cfg, layout).to_dict()
    finally:
        os.environ.pop(FAULT_ENV, None)


@pytest.mark.slow
def test_two_workers_survive_a_crash_resume_and_log_to_mlflow_from_rank_0(
    ray_cluster, mnist_shards, featurized_repo, tmp_path
):
    # 4,500 train images / (2 x 64) = 35 steps per epoch; checkpoint at 20; rank 1 dies at 25.
    cfg = ray_config(mnist_shards, tmp_path, **{
        "train.num_workers": 2, "train.batch_size": 64, "train.epochs": 2,
        "train.checkpoint_every_steps": 20, "train.max_failures": 1,
        "train.eval_every_images": 0,  # quality at every epoch's end
    })
    out = tmp_path / "out"
    record = run_stage(cfg, mnist_shards, out, fault="step=25,rank=1,mode=exit",
                       classifier_from=featurized_repo)

    assert (Path(cfg.train.storage_path) / record["ray_run_name"] / "fault_injected").exists()
    assert record["steps"] == 70 and record["images_seen"] == 70 * 128
    assert record["resumed_from_steps"] == [20]
    assert record["params_identical_across_ranks"] is True

    with (out / "reports/train_log.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [10, 20, 30, 35, 40, 50, 60, 70]
    assert sorted(p.name for p in (out / "reports/train_grids").iterdir()) == [
        "epoch_001.png", "epoch_002.png"
    ]
    # Quality at each epoch end, measured by rank 0 with the classifier, N = eval.num_samples.
    with (out / "reports/train_quality.csv").open() as handle:
        quality = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in quality] == [35, 70]
    assert record["quality"]["final_fid_classifier"] == pytest.approx(
        float(quality[-1]["fid_classifier"]))
    assert record["quality"]["best_step"] in (35, 70) and record["quality_skipped_reason"] is None
    assert TrainRun.from_dict(record).to_dict() == record  # the nested summary round-trips
    spec = json.loads((out / "models/generator.json").read_text())
    generator = Generator(**spec["spec"])
    generator.load_state_dict(torch.load(out / "models/generator.pt", weights_only=True))
    assert spec["spec"] == GeneratorSpec(16, 8, 32, 1).to_dict() and spec["steps"] == 70

    from mlflow import MlflowClient

    client = MlflowClient(record["tracking_uri"])
    run = client.get_run(record["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    # Outside git nothing is known to differ: a baseline (of no commit); the Ray run is a tag.
    assert run.info.run_name == "baseline"
    assert run.data.tags["ray_run_name"] == record["ray_run_name"]
    assert run.data.params["train.num_workers"] == "2" and run.data.params["model.ngf"] == "8"
    assert "train.storage_path" not in run.data.params  # settings live in config.yaml
    config = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert f"storage_path: {cfg.train.storage_path}" in Path(config).read_text()
    # Steps count images seen (2 workers x 64 per optimizer step).
    logged_steps = [step * 128 for step in (10, 20, 30, 35, 40, 50, 60, 70)]
    for key in ("train/loss_d", "train/loss_g", "train/d_real", "train/d_fake",
                "system/images_per_s"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        # One value per logged step: a second writer (rank 1) would double them.
        assert sorted(steps) == logged_steps, key
    for key in ("quality/fid_classifier", "quality/class_coverage"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == [35 * 128, 70 * 128], key
    assert run.data.tags["mlflow.note.content"].startswith("trained: best in-training FID")
    assert not {"loss_d", "epoch", "images_per_s"} & set(run.data.metrics)
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    pngs = [path for path in images if path.endswith(".png")]
    grid_steps = sorted(int(path.split("+step+")[1].split("+")[0]) for path in pngs)
    # One grid before training (the UI's slider opens on it), then one per epoch.
    assert grid_steps == [0, 35 * 128, 70 * 128]
    with Image.open(client.download_artifacts(run.info.run_id, pngs[0], str(tmp_path))) as grid:
        assert grid.size == (3 * 274, 3 * 274)  # 8 x 8 of 32 px, enlarged to be read
    # The same grids under names a person reads in order.
    named = [a.path for a in client.list_artifacts(run.info.run_id, "grids")]
    assert named == ["grids/epoch_001.png", "grids/epoch_002.png"]


@pytest.mark.slow
def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(
    ray_cluster, mnist_shards, tmp_path
):
    """One worker on CPU, crashed at step 15 and resumed from the (mid-epoch) checkpoint at
    10, ends with the very bits of the same loop run straight through without Ray."""
    cfg = ray_config(mnist_shards, tmp_path, **{
        "train.num_workers": 1, "train.batch_size": 128, "train.epochs": 1,
        "train.checkpoint_every_steps": 10, "train.max_failures": 1,
    })
    resumed = run_stage(cfg, mnist_shards, tmp_path / "resumed", fault="step=15,rank=0,mode=raise")
    assert resumed["resumed_from_steps"] == [10] and resumed["steps"] == 35
    assert_as_straight_run(cfg, resumed, tmp_path / "resumed")

    # The fits' actors are Ray Train's own, but no Ray Data dataset manager (the training reads
    # its shards itself: ray_runner drops that actor), for this fit nor any on this cluster.
    from ray.util.state import list_actors

    actors = list_actors(limit=10_000, raise_on_missing_output=False)
    classes = {actor.class_name for actor in actors}
    assert {"TrainController", "RayTrainWorker"} <= classes and "DatasetManager" not in classes


def assert_as_straight_run(cfg: Config, record: dict, workspace: Path) -> None:
    """The run of `record` (one worker, its outputs in `workspace`) ended with the very bits
    of the same loop run straight through without Ray: checkpoint, generator.pt (the
    average) and generator_raw.pt (the last step's weights)."""
    from pipeline.data.cache import training_batches
    from pipeline.data.reader import shard_urls

    torch.set_num_threads(cfg.train.cpus_per_worker)  # as the Ray worker does
    urls = shard_urls("train", cfg.train.shards)
    steps_per_epoch = record["steps_per_epoch"]
    straight = training.TrainLoop(
        cfg, training.LoopEnv(0, 1, torch.device("cpu"), steps_per_epoch), LocalHooks()
    )
    straight.run(training_batches(
        urls, cache=cfg.train.data_cache, split_shape=(4500, 1, 32, 32),
        batch_size=cfg.train.batch_size, rank=0, world_size=1, num_batches=steps_per_epoch,
        seed=cfg.train.seed, device=torch.device("cpu"), decode_processes=1,
        loader_workers=cfg.train.loader_workers,
    ))

    final = checkpoints.load_state(record["final_checkpoint"])
    assert straight.ema is not None  # the weight average is on by default
    models = {"generator": straight.generator, "discriminator": straight.discriminator,
              "generator_ema": straight.ema.model}
    for part, model in models.items():
        for key, tensor in model.state_dict().items():
            assert torch.equal(tensor, final[part][key]), f"{part}.{key} differs after resume"
    for name, model in (("generator", straight.ema.model), ("generator_raw", straight.generator)):
        saved = torch.load(workspace / f"models/{name}.pt", weights_only=True)
        assert saved.keys() == model.state_dict().keys()
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in saved.items()), name


# --- preflight ----------------------------------------------------------------------------------


def test_missing_shards_fail_in_one_line_before_ray(tmp_path):
    from pipeline.train.preflight import check_inputs

    cfg = tiny_config(**{"train.shards": str(tmp_path / "nowhere")})
    with pytest.raises(UserError, match="no train shards") as caught:
        check_inputs(cfg, Layout(tmp_path))
    assert "\n" not in str(caught.value)


def test_too_many_cpus_per_worker_fail_before_any_worker(ray_cluster, mnist_shards, tmp_path):
    from pipeline.train import train

    cfg = ray_config(mnist_shards, tmp_path, **{"train.num_workers": 2,
                                                "train.cpus_per_worker": 64})
    with pytest.raises(UserError, match="Ray has 4 CPUs, train needs 128"):
        train.run(cfg, layout_with_stats(mnist_shards, tmp_path))
    assert not (tmp_path / "ray_storage").exists()


def test_an_unreachable_tracking_server_is_a_one_line_exit(mnist_shards, tmp_path):
    from conftest import stage_env

    from devtools.gloo import free_port

    result = subprocess.run(
        [sys.executable, "stages/train.py", "-S", f"mlflow.tracking_uri=http://127.0.0.1:{free_port()}",
         "-S", f"train.storage_path={tmp_path / 'ray'}"],
        cwd=mnist_shards, env=stage_env(mnist_shards), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: MLflow tracking server http://127.0.0.1:")
    assert "not reachable" in last
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "ray").exists() and not (mnist_shards / "models").exists()


def test_fault_spec_is_validated():
    from pipeline.train.faults import FaultSpec

    assert FaultSpec.parse("step=3,rank=1,mode=exit") == FaultSpec(3, 1, "exit")
    with pytest.raises(UserError, match="DCGAN_FAULT_INJECT"):
        FaultSpec.parse("step=x")


def test_param_digest_sees_a_single_changed_bit():
    model = torch.nn.Linear(3, 2)
    before = training.param_sha256(model)
    with torch.no_grad():
        model.weight[0, 0] = torch.nextafter(model.weight[0, 0], torch.tensor(1.0))
    assert training.param_sha256(model) != before


def test_auto_workers_follow_the_nodes_and_keep_explicit_values():
    from pipeline.train.preflight import NodeResources, resolve_workers

    train = tiny_config().train
    assert (train.num_workers, train.cpus_per_worker) == (0, 0)  # the default: auto
    one_box = [NodeResources(cpus=2, gpus=0)]
    resolved, reason = resolve_workers(train, one_box)
    assert (resolved.num_workers, resolved.cpus_per_worker) == (1, 2) and "auto" in reason
    two_nodes = [NodeResources(cpus=8, gpus=0), NodeResources(cpus=4, gpus=0)]
    resolved, _ = resolve_workers(train, two_nodes)
    assert (resolved.num_workers, resolved.cpus_per_worker) == (2, 4)
    gpu_node = [NodeResources(cpus=16, gpus=8), NodeResources(cpus=4, gpus=0)]
    resolved, _ = resolve_workers(tiny_config(**{"train.use_gpu": "true"}).train, gpu_node)
    assert (resolved.num_workers, resolved.cpus_per_worker) == (8, 2)
    explicit = tiny_config(**{"train.num_workers": 3}).train
    resolved, _ = resolve_workers(explicit, one_box)
    assert (resolved.num_workers, resolved.cpus_per_worker) == (3, 1)  # 3 ranks share 2 CPUs
    with pytest.raises(UserError, match="no node with a GPU"):
        resolve_workers(tiny_config(**{"train.use_gpu": "true"}).train, one_box)


def test_the_ddp_buffer_keyword_is_the_one_the_installed_torch_knows():
    """torch 2.13 renamed DDP's `broadcast_buffers` to `forward_sync_buffers`; passing the new
    name to an older torch is a TypeError on every rank (the GPU machine has 2.11)."""

    class OlderDDP:
        def __init__(self, module, device_ids=None, broadcast_buffers=True):
            pass

    assert no_forward_buffer_sync(OlderDDP) == {"broadcast_buffers": False}
    OlderDDP(torch.nn.Linear(1, 1), **no_forward_buffer_sync(OlderDDP))
    assert no_forward_buffer_sync() == {"forward_sync_buffers": False}  # the pinned 2.13


@pytest.mark.parametrize(("started_here", "operator", "watcher"), [
    (True, None, "0"), (False, None, None), (True, "1", "1")])
def test_a_ray_of_the_stages_own_runs_no_preemption_watcher(monkeypatch, started_here, operator,
                                                            watcher):
    """What the driver hands Ray Train's controller: the 0.25 s poll always; the preemption
    watcher off only on a Ray the stage started itself (nothing drains its one node); an
    operator's own setting wins."""
    from pipeline.train import ray_runner

    monkeypatch.delenv(ray_runner.CONTROLLER_POLL_ENV, raising=False)
    monkeypatch.delenv(ray_runner.PREEMPTION_WATCHER_ENV, raising=False)
    if operator is not None:
        monkeypatch.setenv(ray_runner.PREEMPTION_WATCHER_ENV, operator)
    ray_runner.set_controller_env(ray_started_here=started_here)
    assert os.environ[ray_runner.CONTROLLER_POLL_ENV] == ray_runner.CONTROLLER_POLL_S
    assert os.environ.get(ray_runner.PREEMPTION_WATCHER_ENV) == watcher
