"""The environment every process of the job needs from its start: the one source of it.

`python -m job` sets it in its own process before anything imports TensorFlow, and the driver
hands it to every Ray worker (RunConfig.worker_runtime_env). Two copies exist for processes the
job does not start itself, `cluster/runtime_env.yaml` (`ray job submit`) and the image's ENV
(`k8s/image/Dockerfile`); tests/test_env.py checks that both say the same.
"""

from __future__ import annotations

import os

JOB_ENV = {
    # tf.keras -> tf-keras, inside TensorFlow too (Keras 3 fails under MWMS with > 1 worker).
    # TensorFlow reads it once, when it is imported: too late if set afterwards.
    "TF_USE_LEGACY_KERAS": "1",
    # TensorFlow's C++ INFO and WARNING lines (errors still show).
    "TF_CPP_MIN_LOG_LEVEL": "2",
    # Ray Train would route every print of a worker through its logger.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # TensorFlow's BFC allocator for host memory, not its default pool (process_state.cc). Under
    # any tf.distribute strategy the default one hands each step's large buffers back to the OS
    # and gets fresh pages again: perf showed ~25 % of a CPU step in page faults and page
    # zeroing, and a step took 1.8x as long as without a strategy (docs/design.md: host memory).
    "TF_CPU_ALLOCATOR_USE_BFC": "true",
}


def job_env() -> dict[str, str]:
    """JOB_ENV, with any value the user set in this process's environment winning."""
    return {name: os.environ.get(name, value) for name, value in JOB_ENV.items()}


def set_job_env() -> None:
    """JOB_ENV in this process, without overriding what the user set."""
    os.environ.update(job_env())
