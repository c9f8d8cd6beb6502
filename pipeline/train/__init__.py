"""Distributed DCGAN training.

`train`: the `train` stage (preflight, the MLflow run, the Ray Train run, the outputs).
`preflight`: the checks that need no worker. `resume`: which interrupted run a stage
continues. `ray_runner`: the one module that calls `ray.train`. `loop`: one rank's training
loop (pure torch). `captured`: the step as one CUDA graph. `placement`: where models and
batches live and how gradients are averaged (DDP or the bucketed all-reduce). `augment`:
differentiable augmentation of what D sees. `ema`: the generator's weight average. `sync_bn`:
SyncBatchNorm for every device. `collectives` and `shm_allreduce`: the collectives beyond
DDP's (the bucketed gradient all-reduce among them), and the shared-memory all-reduce of CPU
ranks on one machine. `checkpoints`: the training state on disk. `mlflow_run`: how a run
looks in MLflow. `tracking_buffer`: rank 0's best-effort tracking. `faults`: fault injection
for tests."""
