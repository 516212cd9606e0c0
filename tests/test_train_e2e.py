"""End-to-end: real Ray, 2 real MWMS workers, real Parquet shards, real checkpoints on disk.

Each run trains the reference model on the small real subset (960 train images) through the CLI.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from job import data as D
from tests.conftest import (
    INTERRUPTED_EPOCHS,
    REPO,
    error_line,
    interrupted_run_args,
    metrics_of,
    run_cli,
    same_model,
    train_args,
    wait_for,
)

pytestmark = pytest.mark.slow


def checkpoint_epoch(checkpoint_dir) -> int:
    """The epoch a checkpoint dir was saved after (its state.json)."""
    return json.loads((checkpoint_dir / "state.json").read_text())["epoch"]


@pytest.fixture(scope="module")
def finished_run(small_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    result = run_cli(*train_args(small_data, tmp, "--epochs", "2", "--num-workers", "2",
                                 "--promote-to", str(tmp / "models"), "--min-accuracy", "0.1",
                                 "--progress-seconds", "0.01"))
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp, result


def test_two_worker_run_writes_metrics_and_keeps_the_best_and_latest_checkpoints(finished_run):
    tmp, result = finished_run
    metrics = metrics_of(tmp)
    assert metrics["params"] == 841_546
    assert metrics["num_workers"] == 2 and metrics["epochs_completed"] == 2
    # 960 train images, global batch 64: 15 steps an epoch; the best epoch's count is recorded
    assert metrics["global_batch_size"] == 64
    assert metrics["optimizer_steps"] == 15 * metrics["best_epoch"]
    assert [h["optimizer_steps"] for h in metrics["history"]] == [15, 30]
    assert len(metrics["epoch_seconds"]) == 2 and all(s > 0 for s in metrics["epoch_seconds"])
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["test_loss"] > 0
    # the small subset is easy to beat chance on, even in 2 epochs
    assert metrics["test_accuracy"] > 0.15
    assert os.path.isdir(metrics["checkpoint"])
    run_dir = tmp / "ckpt" / metrics["run_name"]
    checkpoints = sorted(p for p in os.listdir(run_dir) if (run_dir / p).is_dir())
    # saved by all ranks every epoch, uploaded by rank 0; kept: the best and the latest
    kept = {checkpoint_epoch(run_dir / c) for c in checkpoints}
    assert kept == {metrics["best_epoch"], 2} and len(checkpoints) == len(kept)
    assert {"state.json", "ckpt.index"} <= set(os.listdir(run_dir / checkpoints[-1]))
    # the driver printed one summary line per epoch
    assert result.stdout.count(f"[{metrics['run_name']}] epoch ") - result.stdout.count(" steps, ") == 2


def test_a_healthy_run_prints_only_the_jobs_own_lines(finished_run):
    # No library start-up lines (TensorFlow's C++ chatter, Ray's actor warnings) on the console:
    # a start line, progress lines, one line per epoch, the promotion verdict, the result.
    _, result = finished_run
    progress = re.compile(r"\[seed-w2-e2-\w+\] epoch [12]/2: \d+/15 steps, .*$")
    job_line = re.compile(r"\[seed-w2-e2-\w+\] (training seed on 2 worker\(s\), .*|epoch [12]/2: loss .*|"
                          r"promoted to .*|test accuracy .*)$")
    lines = (result.stdout + result.stderr).splitlines()
    assert [line for line in lines if not (job_line.match(line) or progress.match(line))] == []
    assert len([line for line in lines if job_line.match(line)]) == 5


def test_progress_lines_inside_each_epoch_off_a_terminal(finished_run):
    # Not a terminal (captured): plain lines, rank 0's steps so far, before the epoch's summary.
    # 15 steps an epoch run 8 at a time (--steps-per-execution 8): one line at step 8.
    _, result = finished_run
    lines = result.stdout.splitlines()
    for epoch in (1, 2):
        summary = next(i for i, line in enumerate(lines) if f"] epoch {epoch}/2: loss " in line)
        before = [line for line in lines[:summary] if f"] epoch {epoch}/2: " in line]
        assert len(before) == 1 and re.search(r": 8/15 steps, loss [\d.]+ acc [\d.]+ \(\d+s, ETA \d+s\)$",
                                              before[0]), lines


def validation_scores(model, data: str) -> tuple[float, float]:
    """(accuracy, loss) of `model` over every partition's validation batches, as fit's
    validation reads them (stored order, whole micro-batches of the global batch 64)."""
    import numpy as np

    parts = D.read_partitions(data, "val")
    micro = 64 // len(parts)
    steps = min(len(labels) for _, labels in parts.values()) // micro
    images = np.concatenate([im[: steps * micro] for im, _ in parts.values()]) / np.float32(255)
    labels = np.concatenate([lab[: steps * micro] for _, lab in parts.values()])
    probs = model.predict(images, verbose=0)
    loss = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1)).mean()
    return (probs.argmax(1) == labels).mean(), loss


def checkpoint_model(metrics: dict, **settings):
    """The model of the run's best checkpoint, as the driver loads it for the test."""
    import ray.train

    from job.config import JobConfig
    from job.results import load_checkpoint_model

    return load_checkpoint_model(JobConfig(**settings),
                                 ray.train.Checkpoint.from_directory(metrics["checkpoint"]))


def test_epoch_metrics_are_those_of_all_workers(finished_run, small_data):
    # Steps report their own replica's metrics; the epoch's figures must still be the all-worker
    # ones: the validation loss and accuracy recomputed from the checkpoint's weights over every
    # partition's validation batches match what was logged.
    tmp, _ = finished_run
    metrics = metrics_of(tmp)
    logged = metrics["history"][metrics["best_epoch"] - 1]
    accuracy, loss = validation_scores(checkpoint_model(metrics, data=small_data), small_data)
    assert accuracy == pytest.approx(logged["val_accuracy"], abs=1e-6)
    assert loss == pytest.approx(logged["val_loss"], rel=1e-4)


@pytest.fixture(scope="module")
def ema_run(small_data, tmp_path_factory) -> dict:
    """metrics.json of an --ema-momentum run with the interrupted runs' settings, uninterrupted."""
    tmp = tmp_path_factory.mktemp("ema")
    r = run_cli(*interrupted_run_args(small_data, tmp, "--ema-momentum", "0.9"))
    assert r.returncode == 0, r.stderr[-3000:]
    return metrics_of(tmp)


def test_validation_and_test_score_the_weights_moving_average(ema_run, small_data):
    # --ema-momentum: the checkpoint keeps the trained weights (training resumes from them) and
    # their average; validation chose the checkpoint by the average, the test scored it.
    metrics = ema_run
    logged = metrics["history"][metrics["best_epoch"] - 1]
    averaged = validation_scores(checkpoint_model(metrics, data=small_data, ema_momentum=0.9),
                                 small_data)
    trained = validation_scores(checkpoint_model(metrics, data=small_data), small_data)
    assert averaged == pytest.approx((logged["val_accuracy"], logged["val_loss"]), rel=1e-4)
    assert trained[1] != pytest.approx(logged["val_loss"], rel=1e-3)


def test_per_class_accuracy_and_confusion_matrix_add_up(finished_run):
    tmp, _ = finished_run
    metrics = metrics_of(tmp)
    confusion = metrics["confusion_matrix"]
    assert sum(map(sum, confusion)) == 1200
    correct = sum(confusion[i][i] for i in range(10))
    assert correct / 1200 == pytest.approx(metrics["test_accuracy"])
    assert list(metrics["per_class_accuracy"])[0] == "T-shirt/top"
    for name in ("learning_curves.png", "confusion_matrix.png"):
        assert (tmp / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp / "out" / "tensorboard" / "train"))


def test_a_good_enough_run_is_promoted_to_current(finished_run):
    tmp, _ = finished_run
    metrics = metrics_of(tmp)
    assert metrics["promotion"]["accepted"] and metrics["promotion"]["min_accuracy"] == 0.1
    current = metrics_of(tmp / "models", "current")
    assert current["run_name"] == metrics["run_name"]
    assert (tmp / "models" / "current" / "model" / "saved_model.pb").exists()


def test_a_rejected_model_ends_the_run_with_exit_status_3(finished_run, small_data):
    tmp, _ = finished_run  # its run again (resumed: finished), against a stricter gate
    r = run_cli("train", "--data", small_data, "--output", str(tmp / "out-strict"),
                "--storage-path", str(tmp / "ckpt"), "--epochs", "2", "--num-workers", "2",
                "--promote-to", str(tmp / "models-strict"), "--min-accuracy", "0.99")
    assert r.returncode == 3, r.stderr[-3000:]
    assert error_line(r).startswith("error: not promoted: test accuracy "), r.stderr[-3000:]
    assert "] already trained (2 epoch(s) in " in r.stdout  # from storage: no Ray, no worker
    assert metrics_of(tmp, "out-strict")["promotion"]["accepted"] is False
    assert not (tmp / "models-strict" / "current").exists()


def test_the_promoted_model_is_served_as_tf_serving_loads_it(finished_run, small_data):
    import numpy as np
    import tensorflow as tf

    from job.data import read_split

    tmp, _ = finished_run
    metrics = metrics_of(tmp)
    serving = tmp / "models" / "serving"
    assert os.listdir(serving) == ["1"]  # BASE/<integer version>/ ...
    assert (serving / "1" / "saved_model.pb").exists() and (serving / "1" / "variables").is_dir()
    signature = tf.saved_model.load(str(serving / "1")).signatures["serving_default"]
    images, labels = read_split(small_data, "test")
    [name] = signature.structured_input_signature[1]  # servers call it by its input's name
    pixels = tf.constant(images.reshape(-1, 28, 28, 1) / 255.0, tf.float32)
    [probabilities] = signature(**{name: pixels}).values()
    accuracy = float(np.mean(np.argmax(probabilities, axis=1) == labels))
    assert accuracy == pytest.approx(metrics["test_accuracy"])


def test_exported_model_reloads_and_scores_the_same(finished_run, small_data):
    tmp, _ = finished_run
    metrics = metrics_of(tmp)
    r = run_cli("evaluate", "--model", str(tmp / "out" / "model"), "--data", small_data)
    assert r.returncode == 0, r.stderr[-2000:]
    scored = json.loads(r.stdout)
    assert scored["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert scored["test_loss"] == pytest.approx(metrics["test_loss"], rel=1e-4)


def test_output_dir_of_another_run_is_left_alone(finished_run, small_data):
    tmp, _ = finished_run
    before = (tmp / "out" / "metrics.json").read_text()
    r = run_cli(*train_args(small_data, tmp, "--epochs", "3"), timeout=120)
    assert r.returncode == 2
    assert "holds run 'seed-w2-e2-" in error_line(r)
    assert (tmp / "out" / "metrics.json").read_text() == before


TOO_MANY_CPUS = str(os.cpu_count() + 1)  # more than any local Ray of this host has, whatever its size


def test_more_workers_than_the_cluster_can_place(small_data, tmp_path):
    r = run_cli(*train_args(small_data, tmp_path, "--num-workers", "1", "--cpus-per-worker",
                            TOO_MANY_CPUS, "--epochs", "1"), timeout=300)
    assert r.returncode == 2
    assert error_line(r) == f"error: cannot place 1 workers: they need {TOO_MANY_CPUS} CPU, the Ray " \
                            f"cluster has {os.cpu_count()}"
    assert not (tmp_path / "out").exists()


def test_two_retrains_of_the_same_day_prepare_the_missing_data_once(source_dir, tmp_path):
    """`retrain` = prepare-data (if the dataset is missing) + train, one command and one status.
    Two of the same day started together: one writes the dataset while the other waits for it.
    A worker bigger than this machine cannot be placed, so each stops right after the data."""
    data = tmp_path / "data"
    _, *flags = train_args(str(data), tmp_path, "--num-workers", "1", "--cpus-per-worker", TOO_MANY_CPUS,
                           "--name", "retrain-%Y%m%d")
    both = [subprocess.Popen([sys.executable, "-m", "job", "retrain", "--source", source_dir, *flags],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = [subprocess.CompletedProcess(p.args, 0, *p.communicate(timeout=300)) for p in both]
    for p, r in zip(both, results, strict=True):
        r.returncode = p.returncode
    for r in results:
        assert r.returncode == 2, r.stderr[-3000:]
        line = error_line(r)  # placed nothing, or found the other one holding the day's run
        assert line.startswith("error: cannot place 1 workers") or re.match(
            r"error: run 'retrain-\d{8}' is already being trained by driver pid", line), line
    counts = {split: sum(files.values()) for split, files in D.load_manifest(str(data))["splits"].items()}
    assert counts == {"train": 48_000, "val": 12_000, "test": 10_000}


def test_gpu_workers_on_a_cluster_without_gpus(small_data, tmp_path):
    r = run_cli(*train_args(small_data, tmp_path, "--use-gpu", "--epochs", "1"), timeout=300)
    assert r.returncode == 2
    assert error_line(r) == "error: cannot place 2 workers: they need 2 GPU, the Ray cluster has 0"


def test_a_wrong_cluster_address_fails_fast(small_data, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    r = run_cli(*train_args(small_data, tmp_path, "--ray-address", f"127.0.0.1:{port}"), timeout=60)
    assert r.returncode == 2
    assert error_line(r) == f"error: cannot reach the Ray cluster at 127.0.0.1:{port}: Connection refused"


def staging(tmp: Path) -> list[str]:
    """OUTPUT's staging dirs (write_output's, until its rename)."""
    return [p.name for p in tmp.glob("out.staging-*")]


def driver(args: list[str]) -> subprocess.Popen:
    """`python -m job ARGS` in a session of its own (with its local Ray and workers)."""
    return subprocess.Popen([sys.executable, "-m", "job", *args], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def running_until_its_first_checkpoint(args: list[str], run_dir: Path) -> subprocess.Popen:
    """A driver, running, once Ray has registered the checkpoint of epoch 1 (its snapshot file):
    a checkpoint dir alone may not be registered yet."""
    proc = driver(args)
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoint_manager_snapshot.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.5)
    return proc


def kill(proc: subprocess.Popen) -> None:
    """A driver, its local Ray and its workers, at once."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_interrupted_run_resumes_a_second_driver_is_refused_and_output_is_never_half_written(
        small_data, uninterrupted_run, tmp_path):
    args = train_args(small_data, tmp_path, "--epochs", str(INTERRUPTED_EPOCHS), "--name", "resume-me")
    proc = running_until_its_first_checkpoint(args, tmp_path / "ckpt" / "resume-me")
    # A second driver of the same run, while the first is alive, is refused at once.
    second = run_cli(*args, timeout=60)
    assert second.returncode == 2 and proc.poll() is None
    assert re.fullmatch(rf"error: run 'resume-me' is already being trained by driver pid {proc.pid} "
                        rf"on host {re.escape(socket.gethostname())} since \S+Z \(lock "
                        rf"{re.escape(str(tmp_path / 'ckpt' / '.resume-me.lock'))}\); not starting a "
                        rf"second training of it", error_line(second)), error_line(second)
    kill(proc)  # a driver that dies holds no lock: the rerun resumes
    assert not (tmp_path / "out").exists()

    # The rerun resumes and trains to the end; its driver is killed while it writes OUTPUT.
    proc = driver(args)
    wait_for(lambda: staging(tmp_path) or proc.poll() is not None, "OUTPUT's staging dir", 400)
    kill(proc)
    assert staging(tmp_path), "the driver ended before writing OUTPUT"
    assert not (tmp_path / "out").exists()  # OUTPUT is never half-written: it is not there at all

    r = run_cli(*args)  # the finished run: scored and written again
    assert r.returncode == 0, r.stderr[-3000:]
    assert not staging(tmp_path)  # the killed driver's leftover is gone
    assert {"metrics.json", "model"} <= set(os.listdir(tmp_path / "out"))
    metrics = metrics_of(tmp_path)
    assert metrics["epochs_completed"] == INTERRUPTED_EPOCHS
    assert 1 <= metrics["resumed_from_epochs"][0] < INTERRUPTED_EPOCHS, metrics["resumed_from_epochs"]
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3, 4]
    # Deterministic resumption: the model is the one the uninterrupted run trained.
    assert same_model(metrics, uninterrupted_run)


def test_a_killed_run_resumes_the_weights_moving_average_too(ema_run, small_data, tmp_path):
    # The checkpoint carries the average beside the weights and Adam's slots: a run killed after
    # epoch 1 and started again ends with the uninterrupted run's model, average included.
    args = interrupted_run_args(small_data, tmp_path, "--ema-momentum", "0.9", "--name", "ema")
    kill(running_until_its_first_checkpoint(args, tmp_path / "ckpt" / "ema"))
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = metrics_of(tmp_path)
    assert 1 <= metrics["resumed_from_epochs"][0] < INTERRUPTED_EPOCHS, metrics["resumed_from_epochs"]
    assert same_model(metrics, ema_run)


def test_one_worker_trains_what_two_workers_train(finished_run, small_data, tmp_path):
    # Elastic determinism: the same global batches on any worker count that divides the
    # partitions (4 shards here), so only floating-point summation order differs.
    r = run_cli(*train_args(small_data, tmp_path, "--epochs", "2", "--num-workers", "1"))
    assert r.returncode == 0, r.stderr[-3000:]
    one = metrics_of(tmp_path)
    two = metrics_of(finished_run[0])
    assert (one["world_sizes"], two["world_sizes"]) == ([1, 1], [2, 2])
    assert abs(one["test_loss"] - two["test_loss"]) <= 0.002
    assert abs(one["test_accuracy"] - two["test_accuracy"]) <= 0.002


def test_past_its_time_budget_the_driver_stops_training_and_writes_nothing(small_data, tmp_path):
    # What a RayJob's activeDeadlineSeconds does not do: stop the training (Ray Train's abort).
    started = time.monotonic()
    r = run_cli(*train_args(small_data, tmp_path, "--epochs", "500", "--time-budget", "20",
                            "--promote-to", str(tmp_path / "models"), "--min-accuracy", "0"))
    assert r.returncode == 2 and time.monotonic() - started < 90, r.stderr[-3000:]
    assert error_line(r).startswith("error: time budget of 20 s (--time-budget) exceeded: training "
                                    "stopped, nothing written or promoted")
    assert not (tmp_path / "out").exists() and not (tmp_path / "models" / "current").exists()
    assert (tmp_path / "ckpt").exists()  # the checkpoints stay for a rerun


def test_a_training_step_runs_one_collective_the_gradients(small_data):
    # Counted as `make bench` counts them: TensorFlow's own log of each collective a worker runs.
    # 15 training steps and 3 validation steps; besides them the start-up broadcast of the
    # variables (34) and the checkpoint and epoch-end metrics (12) run 46 (as in `make bench`,
    # at any number of steps). One more per step (a metric's all-reduce, the has-value flag of
    # get_next_as_optional, a summed step output) adds 18: over the bound.
    from bench.run import collectives_run

    collectives, steps = collectives_run(small_data, os.cpu_count())
    assert steps == 15
    assert steps + 46 <= collectives <= steps + 46 + 5, collectives
