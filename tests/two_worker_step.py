"""One training step of the seed model on two MWMS workers (no Ray), once per all-reduce setting:
prints, for each, the gradients' all-reduce packs as the step's graph holds them (type, elements,
in launch order) and the weights after the step.

    python -m tests.two_worker_step RANK PORT0,PORT1 none:0 fp16:1 ...   # COMPRESSION:PACK_MB
"""

import json
import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from job.model import build_model  # noqa: E402
from job.step import JobSteps  # noqa: E402

rank, ports, settings = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3:]
os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                                      "task": {"type": "worker", "index": rank}})
strategy = tf.distribute.MultiWorkerMirroredStrategy()
rng = np.random.default_rng(rank)  # each worker its own batch
batch = (tf.constant(rng.random([32, 28, 28, 1], np.float32)), tf.one_hot(rng.integers(0, 10, 32), 10))
for setting in settings:
    compression, pack_mb = setting.split(":")
    tf.keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build_model("seed", 1e-3, sequential=JobSteps)
        model.configure_steps(None, compression, float(pack_mb))
        model.optimizer.build(model.trainable_variables)
    step = tf.function(lambda m=model: strategy.run(m.train_step, args=(batch,)))
    packs = [(op.inputs[0].dtype.name, op.inputs[0].shape.num_elements())
             for op in step.get_concrete_function().graph.get_operations()
             if op.type == "CollectiveReduceV2"]
    step()
    print(json.dumps({"setting": setting, "packs": packs,
                      "weights": [v.numpy().ravel().tolist() for v in model.trainable_variables]}))
