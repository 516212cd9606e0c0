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

STATE_FILE = "state.json"  # epoch, per-epoch history and restarts, beside the TF checkpoint
PREFETCH_BATCHES = 2  # the next batch is ready while the current step runs
WEIGHTS_PREFIX = "ckpt"  # tf.train.Checkpoint: weights + optimizer slots + step counter


def keep_collectives_on_loopback() -> None:
    """Point TF_CONFIG at 127.0.0.1 when this Ray node lives on loopback.

    Ray Train gives TensorFlow each worker's address as seen from the machine's default route.
    A node registered as 127.0.0.1 (local and test clusters) is only reachable from this machine,
    so all its peers are here too: their collectives should stay on loopback.
    """
    node_id = ray.get_runtime_context().get_node_id()
    node_ip = next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id)
    if node_ip != "127.0.0.1":
        return
    tf_config = json.loads(os.environ["TF_CONFIG"])
    workers = tf_config["cluster"]["worker"]
    tf_config["cluster"]["worker"] = [f"127.0.0.1:{w.rsplit(':', 1)[1]}" for w in workers]
    os.environ["TF_CONFIG"] = json.dumps(tf_config)


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


def _per_device_datasets_without_autotune() -> None:
    """Work around a TF 2.21 teardown stall in MultiWorkerMirroredStrategy's input iterators.

    MWMS feeds each replica through a MultiDeviceIterator whose per-device datasets are built
    inside TensorFlow with default options, so tf.data autotuning runs on them. Destroying such
    an iterator (end of fit, end of each validation pass) joins its autotuner thread, which was
    seen (gdb) still sleeping out its optimisation period - up to 60 s - after cancellation.
    The per-device stage only forwards batches, so it has nothing to tune.
    """
    from tensorflow.python.data.ops import multi_device_iterator_ops as mdi

    create = mdi._create_device_dataset
    if getattr(create, "autotune_off", False):
        return
    options = tf.data.Options()
    options.autotune.enabled = False

    def create_without_autotune(*args, **kwargs):
        return create(*args, **kwargs).with_options(options)

    create_without_autotune.autotune_off = True
    mdi._create_device_dataset = create_without_autotune


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
    keep_collectives_on_loopback()
    _per_device_datasets_without_autotune()
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
        verbose=2 if rank == 0 else 0,  # one line per epoch, from rank 0 only
    )
