"""The driver: JobConfig -> Ray TensorflowTrainer -> best checkpoint -> test score -> OUTPUT/.

Runs on your laptop (`make train-local`, which starts a private Ray on 127.0.0.1) or on a Ray
cluster's head (`ray job submit ... -- python -m job train ...`, where $RAY_ADDRESS is set).
Nothing is written to OUTPUT until the run has finished; then OUTPUT is replaced in one rename.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from functools import partial

from job import data as D
from job.config import JobConfig, JobError, ModelRejected
from job.env import job_env
from job.guards import StorageWatch, TimeBudget, stop_now
from job.results import (
    METRICS_FILE,
    best_checkpoint,
    check_output_dir,
    finished_result,
    load_checkpoint_model,
    run_state,
    score,
    write_json_atomically,
    write_output,
)
from job.runlock import data_lock, output_lock, run_lock

# A worker group Ray cannot place (a lost node not replaced) fails its start after
# RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s), and Ray Train retries that for ever by default
# (controller_failure_limit -1): give up after this many attempts, ~10 min, with one line. An
# elastic run below --min-workers waits without attempts: --time-budget bounds it.
PLACEMENT_ATTEMPTS = 10
# Where Ray keeps every worker's full output (its documented default; on each node of a cluster).
RAY_LOGS = "/tmp/ray/session_latest/logs"
# TensorFlow's native start-up lines in the driver (see workarounds.native_stderr_to).
DRIVER_TF_LOG = os.path.join(tempfile.gettempdir(), "fashion-job-driver-tensorflow.log")
# The cluster's error messages Ray would print into the console (see workarounds.cluster_errors_to).
DRIVER_RAY_LOG = os.path.join(tempfile.gettempdir(), "fashion-job-driver-ray-errors.log")


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a wrong address: ray.init would retry connecting for ever."""
    if address in ("auto", "local"):
        return
    host, _, port = address.split("://")[-1].rstrip("/").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or e
        raise JobError(f"cannot reach the Ray cluster at {address}: {reason}") from None


def start_ray(cfg: JobConfig) -> None:
    if not cfg.ray_address:
        # Ray's single-machine mode: every Ray process, and the addresses Ray Train hands to
        # TensorFlow's collectives, stay on 127.0.0.1. Read when `ray` is first imported.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    from job.workarounds import cluster_errors_to

    # The console shows the job's own lines: Ray's at ERROR only, and no stream of the workers'
    # and Ray Train controller's output (TensorFlow's C++ start-up lines, Ray's actor warnings).
    # That output stays in Ray's log files (RAY_LOGS); a failure's error is raised here.
    cluster_errors_to(DRIVER_RAY_LOG)  # the job's own failure lines stand for them
    quiet = {"logging_config": ray.LoggingConfig(log_level="ERROR"), "log_to_driver": False}
    if cfg.ray_address:
        check_reachable(cfg.ray_address)
        ray.init(address=cfg.ray_address, **quiet)
    else:
        ray.init(address="local", include_dashboard=False, **quiet)
    have = ray.cluster_resources()
    fewest = cfg.world_sizes[0]
    need = {"CPU": fewest * cfg.cpus_per_worker}
    if cfg.use_gpu:
        need["GPU"] = fewest
    for resource, amount in need.items():
        if have.get(resource, 0) < amount:
            raise JobError(f"cannot place {fewest} workers: they need {amount:g} "
                           f"{resource}, the Ray cluster has {have.get(resource, 0):g}")


def fit(cfg: JobConfig):
    import ray.train
    from ray.train.tensorflow import TensorflowTrainer
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from job.console import Console, progress_interval
    from job.health import EpochComputeTimes, WorkerGroupFailure
    from job.train import train_loop_per_worker

    # On the driver's node, which lives as long as the run (not on a worker node that may go
    # away); 0 CPUs: the workers may hold every CPU.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    epoch_lines = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})

    class EpochSummary(ray.train.UserCallback):
        """One line per epoch and per resize, and each failure as Ray reported it, sent from
        Ray's train controller to the driver."""

        world_size = None  # of the epoch before
        epoch = None  # the last one checkpointed

        def after_report(self, run_context, metrics, checkpoint):
            m = metrics[0]
            if self.world_size not in (None, m["world_size"]):
                epoch_lines.put(f"[{cfg.run_name}] resized: {self.world_size} -> {m['world_size']} "
                                f"worker(s) (elastic), from epoch {m['epoch']}")
            self.world_size, self.epoch = m["world_size"], m["epoch"]
            epoch_lines.put(EpochComputeTimes(m["epoch"], [round(w.get("compute_ms_per_step", 0), 2)
                                                           for w in metrics]))
            epoch_lines.put(f"[{cfg.run_name}] epoch {m['epoch']}/{cfg.epochs}: loss {m['loss']:.4f} "
                            f"acc {m['accuracy']:.4f} val_loss {m['val_loss']:.4f} "
                            f"val_acc {m['val_accuracy']:.4f} ({m['epoch_seconds']:.1f}s)")

        def after_exception(self, run_context, worker_exceptions):
            epoch_lines.put(WorkerGroupFailure({rank: str(e) for rank, e in worker_exceptions.items()},
                                               self.epoch))

    trainer = TensorflowTrainer(
        train_loop_per_worker,
        # Rank 0 sends its progress inside each epoch to the same queue (job/console.py).
        train_loop_config={**cfg.to_dict(), "progress": (epoch_lines, progress_interval(
            cfg.progress_seconds))},
        scaling_config=ray.train.ScalingConfig(
            # (fewest, most) makes the worker group elastic: Ray starts with what it can place
            # and, after losing workers, goes on with fewer from the last checkpoint.
            num_workers=(cfg.world_sizes[0], cfg.num_workers) if len(cfg.world_sizes) > 1
            else cfg.num_workers,
            elastic_resize_monitor_interval_s=cfg.resize_check_seconds,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=cfg.run_name,
            storage_path=cfg.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures,
                                                   controller_failure_limit=PLACEMENT_ATTEMPTS),
            # Ray keeps the best `num_to_keep` by score and always the latest (resume's).
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints or None,
                checkpoint_score_attribute="val_accuracy", checkpoint_score_order="max"),
            # A value the user set (e.g. to debug) reaches the workers too.
            worker_runtime_env={"env_vars": job_env()},
            callbacks=[EpochSummary()],
            logging_config=ray.train.LoggingConfig(log_level="ERROR"),
        ),
    )
    console = Console(cfg.run_name, after_failure=partial(after_failure, cfg))
    printer = threading.Thread(target=console.print_until_none, args=(epoch_lines,), daemon=True)
    printer.start()

    def print_the_rest():
        if printer.is_alive():
            epoch_lines.put(None)
            printer.join()

    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        print_the_rest()  # the failure Ray reported last, described
        what = console.failures[-1]["what"] if console.failures else last_line(e)
        raise JobError(f"training failed: {what} (workers' full logs: {RAY_LOGS} on their "
                       f"nodes)") from None
    finally:
        print_the_rest()
    return result, console


def last_line(error: Exception) -> str:
    failures = getattr(error, "worker_failures", {}) or {}
    return str(next(iter(failures.values()), error)).strip().splitlines()[-1]


def after_failure(cfg: JobConfig, count: int, epoch: int | None) -> str:
    """What Ray Train does after the count-th failure of a worker group (FailureConfig)."""
    if cfg.max_failures != -1 and count > cfg.max_failures:
        return f"no restarts left (--max-failures {cfg.max_failures})"
    where = f"from epoch {epoch + 1}" if epoch is not None else "from the last checkpoint"
    attempt = f"attempt {count + 1}" + (f" of {cfg.max_failures + 1}" if cfg.max_failures != -1 else "")
    if len(cfg.world_sizes) > 1:
        return (f"restarting {where} with {cfg.world_sizes[0]}-{cfg.num_workers} worker(s), as "
                f"many as Ray can place (elastic; {attempt})")
    return f"restarting {where} ({attempt})"


def train(cfg: JobConfig, budget: TimeBudget):
    """(Ray's result, the console's record), from a Ray cluster the driver leaves afterwards."""
    start_ray(cfg)
    workers = "-".join(map(str, dict.fromkeys([cfg.world_sizes[0], cfg.num_workers])))
    print(f"[{cfg.run_name}] training {cfg.model} on {workers} worker(s), "
          f"global batch {cfg.batch_size}, {cfg.epochs} epoch(s); checkpoints in "
          f"{cfg.storage_path}/{cfg.run_name}", flush=True)

    def storage_stalled(seconds: float) -> None:
        stop_now(f"error: the storage at {cfg.storage_path} has not completed a write for "
                 f"{seconds:.0f} s (--storage-timeout {cfg.storage_timeout}): run stopped, nothing "
                 f"written or promoted (a rerun resumes from the last checkpoint once it answers)")

    try:
        with budget.aborting(), StorageWatch(cfg.storage_path, cfg.storage_timeout, storage_stalled):
            return fit(cfg)
    finally:
        import ray

        ray.shutdown()  # release the cluster before the driver's own evaluation and export


def run(cfg: JobConfig, prepare_data: bool = False) -> dict:
    """Train, evaluate, write OUTPUT (and promote). `prepare_data`: first write cfg.data from the
    official files in cfg.source if it holds no dataset (the scheduled job's one command)."""
    started, budget = time.perf_counter(), TimeBudget(cfg.time_budget)
    if prepare_data and not D.has_dataset(cfg.data):
        with data_lock(cfg.data):  # two first runs write the dataset once
            D.ensure_dataset(cfg.source or D.default_source(), cfg.data)
    manifest = D.validate_dataset(cfg.data)  # bad input fails before anything is written
    D.check_partitions(cfg.data, manifest, cfg.batch_size, cfg.world_sizes)
    # The run's lock first (a second driver of this run is told so), then OUTPUT's (another run
    # writing the same OUTPUT), both held until OUTPUT is written and promoted.
    with run_lock(cfg.storage_path, cfg.run_name), output_lock(cfg.output):
        check_output_dir(cfg)
        return train_and_evaluate(cfg, manifest, started, budget)


def train_and_evaluate(cfg: JobConfig, manifest: dict, started: float, budget: TimeBudget) -> dict:
    from job.workarounds import native_stderr_to

    with native_stderr_to(DRIVER_TF_LOG):  # TensorFlow's import and device discovery
        import tensorflow as tf

        tf.config.list_physical_devices()
    finished = finished_result(cfg)
    if finished is not None:  # a rerun of a finished run (a retried RayJob): nothing to train
        print(f"[{cfg.run_name}] already trained ({cfg.epochs} epoch(s) in {cfg.storage_path}/"
              f"{cfg.run_name}): scoring its best checkpoint again", flush=True)
        (result, state), failures, compute_ms = finished, [], []
    else:
        result, console = train(cfg, budget)
        state, failures, compute_ms = run_state(result), console.failures, console.compute_ms
    checkpoint, best = best_checkpoint(result)
    model = load_checkpoint_model(cfg, checkpoint)
    test = score(model, *D.read_split(cfg.data, "test", manifest))
    history = state["history"]
    sizes = [h.get("world_size") for h in history]
    metrics = {
        "run_name": cfg.run_name,
        "test_accuracy": test["test_accuracy"],
        "test_loss": test["test_loss"],
        "epochs_completed": state["epoch"],
        "num_workers": cfg.num_workers,
        "params": int(model.count_params()),
        "model": cfg.model,
        "best_epoch": best["epoch"],
        "best_val_accuracy": best["val_accuracy"],
        # A hardware-neutral cost: GPU time per epoch is about proportional to optimizer steps.
        "optimizer_steps": best.get("optimizer_steps"),  # None for checkpoints of older versions
        "global_batch_size": cfg.batch_size,
        "checkpoint": checkpoint.path,
        "epoch_seconds": [h["epoch_seconds"] for h in history],
        "world_sizes": sizes,  # the workers that trained each epoch
        "resizes": [{"epoch": h["epoch"], "from": a, "to": b}
                    for h, a, b in zip(history[1:], sizes, sizes[1:], strict=False) if a != b],
        "restarts": len(state["starts"]) - 1,  # starts that resumed: restarts, driver reruns
        # As Ray reported them to this driver, retried or not: workers, cause, what came next.
        "worker_group_failures": failures,
        "compute_ms_per_step": compute_ms,  # every worker's, each epoch (stragglers)
        "resumed_from_epochs": [s for s in state["starts"] if s > 0],
        "history": history,
        "per_class_accuracy": test["per_class_accuracy"],
        "confusion_matrix": test["confusion_matrix"],
        "config": cfg.to_dict(),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    budget.check()
    write_output(cfg.output, model, metrics)
    if cfg.promote_to:
        budget.check()
        from job.promote import promote

        metrics["promotion"] = promote(cfg, cfg.output, metrics)
        write_json_atomically(os.path.join(cfg.output, METRICS_FILE), metrics)
        verdict = "promoted to" if metrics["promotion"]["accepted"] else "NOT promoted to"
        print(f"[{cfg.run_name}] {verdict} {cfg.promote_to}/current: "
              f"{metrics['promotion']['reason']}", flush=True)
    print(f"[{cfg.run_name}] test accuracy {metrics['test_accuracy']:.4f}, "
          f"test loss {metrics['test_loss']:.4f} (best epoch {best['epoch']}); "
          f"wrote {cfg.output}", flush=True)
    if cfg.promote_to and not metrics["promotion"]["accepted"]:
        raise ModelRejected(f"not promoted: {metrics['promotion']['reason']} (the run's results "
                            f"are in {cfg.output}; {cfg.promote_to}/current is unchanged)")
    return metrics
