"""GPU preflight: a worker that Ray gave a GPU must train on it, or the run fails at once.

Ray's GPU reservation is bookkeeping: it sets CUDA_VISIBLE_DEVICES and nothing checks that
TensorFlow can use the device. When TF cannot load CUDA (no driver library, a driver too old,
libraries off the search path) it silently trains on the CPU, and with TF_CPP_MIN_LOG_LEVEL=2 its
"Cannot dlopen some GPU libraries" warning is hidden too. `check_worker_gpus` runs in every
worker before the first step and names the worker, the node, what TF sees and the likely reason.
"""

from __future__ import annotations

import ctypes
import os
import socket

import tensorflow as tf


class GpuUnavailable(RuntimeError):
    """Ray assigned GPUs to a worker that TensorFlow cannot use."""


def gpu_names() -> list[str]:
    """The GPUs TensorFlow can use in this process."""
    return [d.name for d in tf.config.list_physical_devices("GPU")]


def why_no_gpu() -> str:
    """The first broken link between TensorFlow and the GPU, in one phrase."""
    if not tf.test.is_built_with_cuda():
        return "this TensorFlow has no CUDA support (install the package's gpu extra, tensorflow[and-cuda])"
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        return f"the NVIDIA driver library cannot be loaded ({e})"
    status = libcuda.cuInit(0)
    if status != 0:
        name = ctypes.c_char_p()
        libcuda.cuGetErrorName(status, ctypes.byref(name))
        return f"the driver refuses CUDA: cuInit -> {(name.value or b'?').decode()} ({status})"
    return ("the driver works, but TensorFlow did not load its CUDA libraries "
            "(rerun with TF_CPP_MIN_LOG_LEVEL=0 to see which)")


def check_worker_gpus(rank: int, assigned: list) -> None:
    """Raise GpuUnavailable unless TensorFlow sees exactly the `assigned` GPUs of this worker."""
    seen = gpu_names()
    if len(seen) == len(assigned):
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)")
    reason = why_no_gpu() if not seen else "CUDA_VISIBLE_DEVICES does not match Ray's assignment"
    raise GpuUnavailable(
        f"worker {rank} on node {socket.gethostname()}: Ray assigned GPU {','.join(map(str, assigned))} "
        f"(CUDA_VISIBLE_DEVICES={visible}) but TensorFlow sees {len(seen)} GPU(s): {reason}")
