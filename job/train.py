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
import ray.train
import tensorflow as tf
import tf_keras as keras

from job import data as D
from job.config import JobConfig
from job.gpu import check_worker_gpus
from job.model import build_model
from job.workarounds import apply_in_worker

STATE_FILE = "state.json"  # epoch, per-epoch history and restarts, beside the TF checkpoint
PREFETCH_BATCHES = 2  # the next batch is ready while the current step runs
WEIGHTS_PREFIX = "ckpt"  # tf.train.Checkpoint: weights + optimizer slots + step counter


def make_strategy(cfg: JobConfig) -> tf.distribute.Strategy:
    impl = (tf.distribute.experimental.CommunicationImplementation.NCCL if cfg.use_gpu
            else tf.distribute.experimental.CommunicationImplementation.RING)
    return tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(implementation=impl))


def distributed_dataset(strategy, cfg: JobConfig, manifest: dict, split: str, passes: int = 1,
                        training: bool = False):
    """This worker's shards as a distributed dataset, and the steps every rank can take.

    Shards are assigned by input pipeline (= worker) index, so no two workers read the same
    rows; auto-sharding is not used. Every rank must run the same number of steps (the
    collectives would hang otherwise), so all ranks stop at the smallest rank's step count.
    Keras keeps one iterator over a distributed dataset for the whole fit, so the training
    set holds exactly `passes` epochs (an endless `.repeat()` would refill the shuffle buffer
    after the last step for nothing).
    """
    world = ray.train.get_context().get_world_size()
    local_replicas = strategy.num_replicas_in_sync // world  # GPUs per worker (1 on CPU)
    per_replica = cfg.batch_size // strategy.num_replicas_in_sync
    steps = min(D.rows_per_rank(manifest, split, world)) // (per_replica * local_replicas)

    def dataset_fn(ctx: tf.distribute.InputContext):
        images, labels = D.read_split(cfg.data, split, manifest, ctx.input_pipeline_id,
                                      ctx.num_input_pipelines)
        ds = tf.data.Dataset.from_tensor_slices((images, labels))
        if training:
            ds = ds.shuffle(len(labels), seed=cfg.seed + ctx.input_pipeline_id,
                            reshuffle_each_iteration=True)
        ds = ds.batch(per_replica, drop_remainder=True).take(steps * local_replicas).map(normalize)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        # No autotuning (and so no autotuner thread, see below): this in-memory pipeline
        # costs < 1 % of a step.
        options.autotune.enabled = False
        return ds.with_options(options).repeat(passes).prefetch(PREFETCH_BATCHES)

    return strategy.distribute_datasets_from_function(dataset_fn), steps


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
                       optimizer_steps=int(self.model.optimizer.iterations.numpy()))
        self.state["epoch"] = epoch + 1
        self.state["history"].append(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            self.checkpoint.write(os.path.join(tmp, WEIGHTS_PREFIX))
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump(self.state, f, indent=1)
            to_report = ray.train.Checkpoint.from_directory(tmp) if self.rank == 0 else None
            ray.train.report(metrics, checkpoint=to_report)


def load_state(checkpoint_dir: str) -> dict:
    with open(os.path.join(checkpoint_dir, STATE_FILE)) as f:
        return json.load(f)


def train_loop_per_worker(config: dict) -> None:
    cfg = JobConfig(**config)
    threads = cfg.cpus_per_worker  # Ray sets OMP_NUM_THREADS=1, but TF's own pools take every core
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    keras.utils.set_random_seed(cfg.seed)
    tf.get_logger().setLevel("ERROR")  # no per-step collective INFO lines
    absl.logging.set_verbosity(absl.logging.ERROR)
    logging.getLogger().setLevel(logging.WARNING)  # Ray Train's INFO lines, e.g. each report
    rank = ray.train.get_context().get_world_rank()
    if cfg.use_gpu:  # before anything else: a GPU run must not fall back to the CPU silently
        check_worker_gpus(rank, ray.get_gpu_ids())

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
        epochs_left = max(1, cfg.epochs - state["epoch"])
        train_ds, train_steps = distributed_dataset(strategy, cfg, manifest, "train", epochs_left,
                                                    training=True)
        # Keras makes a new iterator over the validation set for every epoch: one pass is enough.
        val_ds, val_steps = distributed_dataset(strategy, cfg, manifest, "val")

        # Variables created inside the scope are mirrored on every replica and kept in sync.
        with strategy.scope():
            model = build_model(cfg.model, cfg.learning_rate, train_steps, cfg.epochs,
                                cfg.jit_compile, cfg.lr_schedule, cfg.warmup_epochs)
            model.optimizer.build(model.trainable_variables)  # slots exist before a restore
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
        callbacks=[ReportEachEpoch(checkpoint, state)],
        verbose=0,  # the driver prints one line per epoch (driver.EpochSummary)
    )
