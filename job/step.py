"""The job's training and test steps: a Sequential whose steps return this replica's own metrics,
time this worker's compute, and all-reduce the gradients as --grad-compression and
--all-reduce-pack-mb say (which bytes cross the network, and when they start).
"""

from __future__ import annotations

import tensorflow as tf
import tf_keras as keras

from job.config import GRAD_COMPRESSIONS
from job.model import mirror_averaged


class JobSteps(keras.Sequential):
    """A Sequential with the job's train and test steps.

    Metrics: tf-keras' steps return `metric.result()`, which in a replica context all-reduces
    each metric's total and count across workers (metrics_utils.result_wrapper): 4 collectives
    a step, each a round trip, on top of the gradients' one. Here a step only updates its
    replica's metric variables (ON_READ: local until read across replicas) and returns their
    local ratio, which is what progress lines show. At the end of each epoch and validation
    pass `fit` replaces the step's logs with `get_metrics_result()`, read outside any replica:
    the all-worker totals, once per epoch, so epoch logs are the exact all-worker figures.

    Gradients: summed across workers here rather than inside apply_gradients, so that they can
    cross the network in 16 bits (Horovod's Compression.fp16: sent and summed in float16 or
    bfloat16, applied to float32 weights) and in packs, the last layers' first (MWMS packs the
    reversed list: the Dense kernel, ~95 % of the bytes and among the first gradients backprop
    makes, starts its all-reduce while the convolutions' gradients are still being computed).
    """

    scores_mirror_averaged = False  # --flips: validation scores as the test and export do
    compute_seconds = None  # a local float64 variable: this worker's compute time (job/health.py)
    wire_dtype = None  # --grad-compression's type (config.GRAD_COMPRESSIONS)
    all_reduce_options = None  # CommunicationOptions with --all-reduce-pack-mb's bytes_per_pack

    @tf.__internal__.tracking.no_automatic_dependency_tracking
    def configure_steps(self, compute_seconds: tf.Variable | None = None, grad_compression="none",
                        all_reduce_pack_mb: float = 0.0) -> None:
        """Not tracked: none of this is part of the checkpoint."""
        self.compute_seconds = compute_seconds
        self.wire_dtype = GRAD_COMPRESSIONS[grad_compression]
        self.all_reduce_options = tf.distribute.experimental.CommunicationOptions(
            bytes_per_pack=int(all_reduce_pack_mb * 2**20))

    def train_step(self, data):
        """tf-keras' step (forward, loss, gradients, all-reduce, apply). The time until the
        gradients exist is this worker's compute; its wait for slower peers is left out."""
        timed = self.compute_seconds is not None
        if timed:
            started = tf.timestamp()
            with tf.control_dependencies([started]):
                data = tf.nest.map_structure(tf.identity, data)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x, y, y_pred, sample_weight)
        grads_and_vars = self.optimizer.compute_gradients(loss, self.trainable_variables, tape)
        if timed:
            with tf.control_dependencies([g for g, _ in grads_and_vars]):
                self.compute_seconds.assign_add(tf.timestamp() - started)
        self.optimizer.apply_gradients(self.all_reduced(grads_and_vars),
                                       skip_gradients_aggregation=True)
        return self.compute_metrics(x, y, y_pred, sample_weight)

    def all_reduced(self, grads_and_vars):
        """The gradients summed over every replica (the loss is already over the global batch)."""
        grads, variables = zip(*grads_and_vars, strict=True)
        sent = [g if self.wire_dtype is None else tf.cast(g, self.wire_dtype) for g in grads]
        summed = tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, sent, options=self.all_reduce_options)
        return [(tf.cast(s, v.dtype), v) for s, v in zip(summed, variables, strict=True)]

    def test_step(self, data):
        if not self.scores_mirror_averaged:
            return super().test_step(data)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred = mirror_averaged(self, x)
        self.compute_loss(x, y, y_pred, sample_weight)
        return self.compute_metrics(x, y, y_pred, sample_weight)

    def compute_metrics(self, x, y, y_pred, sample_weight):
        self.compiled_metrics.update_state(y, y_pred, sample_weight)
        return {m.name: tf.math.divide_no_nan(m.total, m.count) for m in self.metrics}
