"""The per-worker training loop, run by every Ray Train worker (one process per rank).

Ray's TensorflowTrainer sets TF_CONFIG for each worker before this runs, so
MultiWorkerMirroredStrategy finds its peers. Each worker reads only its own Parquet shards; the
strategy all-reduces gradients (RING over gRPC on CPU, NCCL on GPU), so every rank holds the
same weights after every step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time

import absl.logging
import numpy as np
import ray.train
import tensorflow as tf
import tf_keras as keras

from job import data as D
from job import health
from job.config import JobConfig
from job.console import Progress
from job.gpu import check_worker_gpus
from job.model import build_model
from job.step import JobSteps
from job.workarounds import apply_in_worker

STATE_FILE = "state.json"  # epoch, per-epoch history and restarts, beside the TF checkpoint
PREFETCH_BATCHES = 2  # the next batch is ready while the current step runs
WEIGHTS_PREFIX = "ckpt"  # tf.train.Checkpoint: weights + optimizer slots + step counter


def make_strategy(cfg: JobConfig) -> tf.distribute.Strategy:
    impl = (tf.distribute.experimental.CommunicationImplementation.NCCL if cfg.use_gpu
            else tf.distribute.experimental.CommunicationImplementation.RING)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(implementation=impl))
    # MWMS turns this on so that workers with unequal data stop together: every `get_next` then
    # all-reduces a has-value flag across workers (input_lib.py), one collective per step. Here
    # every worker yields the same number of steps by construction (partitioned_dataset).
    strategy.extended.experimental_enable_get_next_as_optional = False
    return strategy


def partitioned_dataset(strategy, cfg: JobConfig, manifest: dict, split: str, epochs: range | None):
    """This worker's part of `split`, and the steps per epoch. `epochs`: the (0-based) epochs to
    draw shuffled orders for; None: one pass in stored order (validation).

    The shards of a split are fixed partitions. Every global step takes the same micro-batch
    (global batch / partitions) from every partition, in an order drawn from (seed, epoch,
    partition) alone, and worker r of W reads partitions r, r+W, ... (no two workers read the
    same rows). So the global batches are the same on any number of workers that divides the
    partition count - runs differ only by floating-point summation order - and a run resumed
    after any epoch sees what the uninterrupted run saw. Keras keeps one iterator for the whole
    fit, so a training set holds exactly the epochs left.
    """
    names = sorted(manifest["splits"][split])
    rows = [manifest["splits"][split][n] for n in names]
    micro = cfg.batch_size // len(names)
    steps = min(rows) // micro

    mirrors = cfg.flips and epochs is not None  # --flips: training images only

    def order(epoch: int | None, partition: int) -> tuple[np.ndarray, np.ndarray]:
        """(steps, micro) row indices, and which of those rows are mirrored (--flips)."""
        if epoch is None:
            drawn, mirrored = np.arange(rows[partition]), np.zeros(rows[partition], bool)
        else:
            rng = np.random.default_rng([cfg.seed, epoch, partition])
            drawn = rng.permutation(rows[partition])
            mirrored = rng.random(rows[partition]) < 0.5 if mirrors else np.zeros_like(drawn, bool)
        return drawn[: steps * micro].reshape(steps, micro), mirrored[: steps * micro].reshape(steps, micro)

    def make(ctx: tf.distribute.InputContext):
        parts = D.read_partitions(cfg.data, split, manifest, ctx.input_pipeline_id,
                                  ctx.num_input_pipelines)
        offsets = np.cumsum([0] + [len(labels) for _, labels in parts.values()])
        drawn = [[order(epoch, p) for p in parts] for epoch in (epochs or [None])]
        # (epochs x steps, this worker's batch): its partitions' micro-batches side by side
        batches = np.concatenate([np.concatenate([offsets[i] + r for i, (r, _) in enumerate(e)], axis=1)
                                  for e in drawn])
        mirrored = np.concatenate([np.concatenate([m for _, m in e], axis=1) for e in drawn])
        per_replica = batches.shape[1] // (strategy.num_replicas_in_sync // ctx.num_input_pipelines)
        images, labels = (np.concatenate(arrays) for arrays in zip(*parts.values(), strict=True))

        def batch(rows, mirror=None):  # the mirror mask only where --flips mirrors: no work else
            picked = tf.gather(images, rows)
            if mirror is not None:
                picked = tf.where(mirror[:, None, None, None], tf.reverse(picked, [2]), picked)
            return normalize(picked, tf.gather(labels, rows))

        slices = batches.reshape(-1, per_replica), mirrored.reshape(-1, per_replica)
        return tf.data.Dataset.from_tensor_slices(slices if mirrors else slices[:1]).map(batch)

    return distribute(strategy, make), steps


def distribute(strategy, make_dataset):
    """A distributed dataset from each worker's own pipeline (no auto-sharding, see above)."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    # No autotuning (and so no autotuner thread, see workarounds.py): the in-memory pipelines
    # cost < 1 % of a step.
    options.autotune.enabled = False
    return strategy.distribute_datasets_from_function(
        lambda ctx: make_dataset(ctx).with_options(options).prefetch(PREFETCH_BATCHES))


def normalize(images, labels):
    """Pixels /255 with the channel dim kept; one-hot labels (as the reference does)."""
    return tf.cast(images, tf.float32) / 255.0, tf.one_hot(tf.cast(labels, tf.int32), D.NUM_CLASSES)


class ReportEachEpoch(keras.callbacks.Callback):
    """Save a checkpoint on every rank and report it to Ray once per epoch.

    Every rank must save (saving under MWMS runs collectives; a rank-0-only save hangs) and
    every rank must call ray.train.report the same number of times. Only rank 0's directory is
    handed to Ray, which uploads it to the run's storage.
    """

    def __init__(self, checkpoint: tf.train.Checkpoint, state: dict):
        super().__init__()
        self.checkpoint, self.state = checkpoint, state
        self.rank = ray.train.get_context().get_world_rank()

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        metrics = {k: float(v) for k, v in logs.items()}
        metrics.update(epoch=epoch + 1, epoch_seconds=time.perf_counter() - self.started,
                       optimizer_steps=int(self.model.optimizer.iterations.numpy()),
                       world_size=ray.train.get_context().get_world_size())
        self.state["epoch"] = epoch + 1
        self.state["history"].append(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            self.checkpoint.write(os.path.join(tmp, WEIGHTS_PREFIX))
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump(self.state, f, indent=1)
            to_report = ray.train.Checkpoint.from_directory(tmp) if self.rank == 0 else None
            ray.train.report(metrics, checkpoint=to_report)


class ProgressToDriver(keras.callbacks.Callback):
    """Rank 0's step count, loss and accuracy, put on the driver's queue at most every `every`
    seconds. The logs are its own replica's (job/step.py), and it reads them only when it
    sends: no worker waits for another, and the other steps pay nothing."""

    def __init__(self, queue, every: float):
        super().__init__()
        self._supports_tf_logs = True  # Keras hands over the step's tensors, unread
        self.queue, self.every = queue, every

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch, self.started = epoch + 1, time.perf_counter()
        self.sent = self.started

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        steps = self.params["steps"]  # fit's params: epochs and steps per epoch
        if now - self.sent < self.every or batch + 1 >= steps:  # the summary line follows
            return
        self.sent = now
        self.queue.put_nowait(Progress(self.epoch, self.params["epochs"], batch + 1, steps,
                                       float(logs["loss"]), float(logs["accuracy"]),
                                       now - self.started))


class ValidateAveragedWeights(keras.callbacks.Callback):
    """--ema-momentum: validation scores the weights' moving average, as the test and the exported
    model do (results.load_checkpoint_model), so the checkpoint is chosen by what is tested.
    Training goes on from its own weights, put back after validation, before the checkpoint."""

    def on_test_begin(self, logs=None):
        self.trained = [v.numpy() for v in self.model.trainable_variables]
        self.model.optimizer.finalize_variable_values(self.model.trainable_variables)

    def on_test_end(self, logs=None):
        for variable, value in zip(self.model.trainable_variables, self.trained, strict=True):
            variable.assign(value)


class SeedRandomLayersEachEpoch(keras.callbacks.Callback):
    """Dropout masks and flips (--model strong) drawn from (seed, epoch, layer) alone.

    tf-keras does not checkpoint its layers' random generators (BaseRandomLayer turns dependency
    tracking off), so a resumed run would draw other masks than the uninterrupted one; reseeding
    every layer's generator at every epoch start makes them the same. Needs tf.random.Generator
    based layers (keras.backend.experimental.enable_tf_random_generator, set before building).
    """

    def __init__(self, seed: int):
        super().__init__()
        self.seed = seed

    def on_epoch_begin(self, epoch, logs=None):
        for index, layer in enumerate(self.model.layers):
            rng = getattr(layer, "_random_generator", None)
            if rng is None:
                continue
            rng._maybe_init()
            state = np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0]
            rng._generator.reset_from_seed(int(state))


def load_state(checkpoint_dir: str) -> dict:
    with open(os.path.join(checkpoint_dir, STATE_FILE)) as f:
        return json.load(f)


def train_loop_per_worker(config: dict) -> None:
    progress_queue, progress_every = config.pop("progress", (None, 0))
    cfg = JobConfig(**config)
    threads = cfg.cpus_per_worker  # Ray sets OMP_NUM_THREADS=1, but TF's own pools take every core
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    keras.utils.set_random_seed(cfg.seed)
    keras.backend.experimental.enable_tf_random_generator()  # see SeedRandomLayersEachEpoch
    tf.get_logger().setLevel("ERROR")  # no per-step collective INFO lines
    absl.logging.set_verbosity(absl.logging.ERROR)
    logging.getLogger().setLevel(logging.WARNING)  # Ray Train's INFO lines, e.g. each report
    rank = ray.train.get_context().get_world_rank()
    if progress_queue is not None:
        health.announce(progress_queue, rank)  # the driver names workers by rank and address
    if cfg.use_gpu:  # before anything else: a GPU run must not fall back to the CPU silently
        check_worker_gpus(rank, ray.get_gpu_ids())
        # cuDNN and cuBLAS otherwise pick non-deterministic kernels: resumption would not be exact.
        tf.config.experimental.enable_op_determinism()

    if cfg.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    apply_in_worker()  # job/workarounds.py: each with the TF/Ray behaviour it avoids
    strategy = make_strategy(cfg)
    manifest = D.load_manifest(cfg.data)
    resume_from = ray.train.get_checkpoint()
    # One copy of the checkpoint (a download, on remote storage) serves both the epoch state,
    # which sizes the training set, and the weights, restored once the model exists.
    with contextlib.ExitStack() as stack:
        ckpt_dir = stack.enter_context(resume_from.as_directory()) if resume_from else None
        state = load_state(ckpt_dir) if ckpt_dir else {"epoch": 0, "history": [], "starts": []}
        state["starts"].append(state["epoch"])
        # At least one epoch, also when resuming a finished run (fit then trains nothing).
        epochs_left = range(min(state["epoch"], cfg.epochs - 1), cfg.epochs)
        train_ds, train_steps = partitioned_dataset(strategy, cfg, manifest, "train", epochs_left)
        # Keras makes a new iterator over the validation set for every epoch: one pass is enough.
        val_ds, val_steps = partitioned_dataset(strategy, cfg, manifest, "val", None)

        # Outside the scope: a plain variable of this worker's own (health.StepTimer reads it).
        compute_seconds = tf.Variable(0.0, dtype=tf.float64, trainable=False)
        # Variables created inside the scope are mirrored on every replica and kept in sync.
        with strategy.scope():
            model = build_model(cfg.model, cfg.learning_rate, train_steps, cfg.epochs,
                                cfg.jit_compile, cfg.lr_schedule, cfg.warmup_epochs,
                                cfg.steps_per_execution, cfg.adam_beta2, cfg.ema_momentum,
                                sequential=JobSteps)
            # The step outputs are replica-local (JobSteps): take this worker's first
            # replica's, where tf-keras' "auto" sums them across workers, one collective each.
            model.distribute_reduction_method = "first"
            model.scores_mirror_averaged = cfg.flips
            model.optimizer.build(model.trainable_variables)  # slots exist before a restore
            model.configure_steps(compute_seconds, cfg.grad_compression, cfg.all_reduce_pack_mb)
            checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
        if ckpt_dir:
            checkpoint.read(os.path.join(ckpt_dir, WEIGHTS_PREFIX)).assert_consumed()

    model.fit(
        train_ds,
        epochs=cfg.epochs,
        initial_epoch=state["epoch"],
        steps_per_epoch=train_steps,
        validation_data=val_ds,
        validation_steps=val_steps,
        callbacks=[SeedRandomLayersEachEpoch(cfg.seed),
                   *([ValidateAveragedWeights()] if cfg.ema_momentum else []),
                   # before ReportEachEpoch, which reports the epoch's compute_ms_per_step
                   *([health.step_timer_callback(progress_queue, rank, compute_seconds)]
                     if progress_queue is not None else []),
                   ReportEachEpoch(checkpoint, state),
                   *([ProgressToDriver(progress_queue, progress_every)]
                     if progress_every and rank == 0 else [])],
        verbose=0,  # the driver prints one line per epoch (driver.EpochSummary)
    )
