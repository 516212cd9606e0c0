"""The GPU path without a GPU: the session's local cluster grants GPUs that do not exist (`ray
start --num-gpus`), and TensorFlow sees none. Such a run must fail at once, not train on the CPU."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO, error_line, run_cli, token_env, train_args

pytestmark = pytest.mark.slow


def test_a_granted_gpu_tensorflow_cannot_use_fails_the_run_before_training(
        cluster, small_data, tmp_path):
    r = run_cli(*train_args(small_data, tmp_path, "--use-gpu", "--num-workers", "2", "--epochs", "3",
                            "--max-failures", "0", "--ray-address", cluster["gcs"]),
                env=token_env(cluster), timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    line = error_line(r)
    assert "Ray assigned GPU 0 (CUDA_VISIBLE_DEVICES=0) but TensorFlow sees 0 GPU(s): " in line, line
    assert line.startswith("error: training failed: ") and " on node " in line
    assert "epoch 1/" not in r.stdout  # not one step on the CPU
    assert not (tmp_path / "out").exists()
    assert not list((tmp_path / "ckpt").glob("*/checkpoint_*"))


@pytest.mark.gpu
def test_one_real_gpu_worker_trains_on_the_gpu(small_data, tmp_path):
    from job.gpu import gpu_names, why_no_gpu

    if not gpu_names():
        pytest.skip(f"no GPU for TensorFlow here: {why_no_gpu()}")
    r = run_cli(*train_args(small_data, tmp_path, "--use-gpu", "--num-workers", "1", "--epochs", "1"))
    assert r.returncode == 0, r.stderr[-3000:]


def test_gpu_check_takes_the_job_flags_and_says_why_it_cannot_run_here(small_data):
    r = subprocess.run([sys.executable, "bench/gpu_check.py", "--data", small_data, "--epochs", "1",
                        "--", "--fast", "--seed", "3"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    from job.gpu import gpu_names

    if gpu_names():
        pytest.skip("a GPU is here: the check would train")
    assert r.returncode == 1, r.stderr[-2000:]  # not argparse's 2: the flags were taken
    assert error_line(r).startswith("error: no GPU for TensorFlow: "), r.stderr[-2000:]
