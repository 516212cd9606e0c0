"""JobConfig: the one place where the job's settings and their defaults live.

Flags, an optional config file (TOML or JSON) and these defaults are merged in that order of
precedence by `job.cli`; everything downstream receives a frozen, validated JobConfig.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

MODEL_NAMES = ("seed", "strong")
LR_SCHEDULES = ("constant", "cosine")
# Named recipes: presets between the defaults and the user's own values (README: measured).
# "large-batch": few, large optimizer steps (GPU time per epoch is about proportional to steps):
# 46 steps an epoch instead of 750. Measured on 2 CPU workers (README): test accuracy 0.9042
# after 920 steps (20 epochs); 0.8894 after 414 (10 epochs); batch 2048 (6e-3, 2 warm-up epochs,
# 460 steps) plateaued at 0.898. `--fast --use-gpu` uses it.
RECIPES = {
    "large-batch": {"batch_size": 1024, "learning_rate": 4e-3, "lr_schedule": "cosine",
                    "warmup_epochs": 1, "epochs": 20},
}
FAST_EPOCHS = 12  # see fast_path_settings
# Ray Train V2 charges every lost worker node to FailureConfig.max_failures, elastic or not
# (failure_handling/default.py): an elastic run needs some to go on after losing a node.
ELASTIC_MAX_FAILURES = 3


class JobError(Exception):
    """A problem with the user's input or environment; the CLI prints it as one line, exit 2."""


def setting(default, help: str):
    """A JobConfig field: its default and the help text its command-line flag shows."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class JobConfig:
    """Every field is also a flag of `train`/`retrain` (`--num-workers` for num_workers), a key of
    `--config FILE`, and a row of README's flag table (tests/test_config.py checks all three)."""

    data: str = setting("", "dataset written by prepare-data (path or pyarrow.fs URI); required")
    source: str = setting("", "retrain only: official IDX files to prepare --data from if it holds "
                              "no dataset (default $FASHION_MNIST_DIR, else Debian's)")
    output: str = setting("runs/local", "results dir: metrics.json, model, plots (strftime codes "
                                        "allowed)")
    storage_path: str = setting("runs/checkpoints", "Ray Train checkpoints: a path all nodes "
                                                    "share, or s3:// gs://")
    name: str = setting("", "Ray run name (strftime codes allowed); rerun with the same name to "
                            "resume (default: derived from the training settings)")
    model: str = setting("seed", f"one of {', '.join(MODEL_NAMES)}; seed is the reference CNN")
    epochs: int = setting(10, "passes over the training set")
    num_workers: int = setting(2, "Ray Train workers, one MWMS replica each (the most, if elastic)")
    min_workers: int = setting(0, "elastic: the fewest workers the run starts or goes on with after "
                                  "losing a node (0: = --num-workers, a fixed size)")
    batch_size: int = setting(64, "GLOBAL batch, split evenly across the workers")
    learning_rate: float = setting(1e-3, "Adam's (peak) learning rate, as in the reference")
    lr_schedule: str = setting("constant", "constant or cosine (decay to 1 % over the run; "
                                           "strong always decays)")
    warmup_epochs: int = setting(0, "linear learning-rate warm-up from 0 over this many epochs")
    recipe: str = setting("", f"a named preset ({', '.join(RECIPES)}); flags given win")
    seed: int = setting(0, "initialisation and shuffle seed")
    use_gpu: bool = setting(False, "one GPU per worker, NCCL all-reduce; a GPU TensorFlow cannot "
                                   "use fails the run")
    cpus_per_worker: int = setting(1, "CPUs Ray reserves per worker; also TensorFlow's threads")
    keep_checkpoints: int = setting(1, "checkpoints kept besides the latest (resume needs it): "
                                       "the best by validation accuracy (0: keep every epoch's)")
    max_failures: int = setting(0, "worker-group restarts from the last checkpoint (-1: no limit; "
                                   f"elastic runs: {ELASTIC_MAX_FAILURES} unless given)")
    ray_address: str = setting("", "an existing Ray cluster (default $RAY_ADDRESS, else a "
                                   "private local Ray on 127.0.0.1)")
    fast: bool = setting(False, f"fast path: on CPUs bigger batches, scaled LR, {FAST_EPOCHS} "
                                "epochs; on GPUs the large-batch recipe, float16, and XLA for one "
                                "worker (flags given win)")
    steps_per_execution: int = setting(8, "training steps per call into TensorFlow's compiled "
                                          "function: fewer Python round-trips (same model)")
    jit_compile: bool = setting(False, "XLA-compile the training step (one worker only)")
    mixed_precision: bool = setting(False, "float16 compute, float32 variables (needs --use-gpu)")
    progress_seconds: float = setting(30.0, "progress inside an epoch: a live line on a "
                                            "terminal, else a line at most this often (0: off)")
    time_budget: int = setting(0, "seconds: past this the driver stops training and exits 2, "
                                  "writing and promoting nothing (0: none); keep it below a "
                                  "RayJob's activeDeadlineSeconds")
    promote_to: str = setting("", "models dir: make this run MODELS/current if it passes the "
                                  "checks below")
    min_accuracy: float = setting(0.90, "promotion floor on test accuracy")
    max_regression: float = setting(0.005, "promotion: largest drop below the current model")
    extra: dict = field(default_factory=dict, compare=False, repr=False)  # unknown keys, refused

    def __post_init__(self):
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1 (got {self.epochs})"),
            (self.num_workers >= 1, f"--num-workers must be >= 1 (got {self.num_workers})"),
            (self.batch_size >= 1, f"--batch-size must be >= 1 (got {self.batch_size})"),
            (0 <= self.min_workers <= self.num_workers,
             f"--min-workers {self.min_workers} must be in [1, --num-workers {self.num_workers}]"),
            *((self.batch_size % w == 0, f"--batch-size {self.batch_size} (global) must divide "
               f"evenly across {w} worker(s), a size the run may have")
              for w in self.world_sizes if w >= 1),
            (self.learning_rate > 0, f"--learning-rate must be > 0 (got {self.learning_rate})"),
            (self.steps_per_execution >= 1,
             f"--steps-per-execution must be >= 1 (got {self.steps_per_execution})"),
            (self.cpus_per_worker >= 1, f"--cpus-per-worker must be >= 1 (got {self.cpus_per_worker})"),
            (self.progress_seconds >= 0,
             f"--progress-seconds must be >= 0 (got {self.progress_seconds})"),
            (self.time_budget >= 0, f"--time-budget must be >= 0 (got {self.time_budget})"),
            (self.keep_checkpoints >= 0,
             f"--keep-checkpoints must be >= 0 (got {self.keep_checkpoints})"),
            (self.max_failures >= -1, f"--max-failures must be >= -1 (got {self.max_failures})"),
            (not self.mixed_precision or self.use_gpu, "--mixed-precision needs --use-gpu"),
            # tf-keras XLA-compiles the whole step, all-reduce included, and XLA cannot compile
            # collectives across processes: not CPU RING, nor NCCL (TF's XLA GPU launcher has no
            # clique-id callback for them; tensorflow issues 58787, 62757).
            (not self.jit_compile or self.num_workers == 1,
             "--jit-compile works with --num-workers 1 only (XLA cannot compile collectives "
             "across worker processes, on CPU or GPU)"),
            (0 <= self.min_accuracy <= 1, f"--min-accuracy must be in [0, 1] (got {self.min_accuracy})"),
            (self.max_regression >= 0, f"--max-regression must be >= 0 (got {self.max_regression})"),
            (self.model in MODEL_NAMES, f"--model must be one of {MODEL_NAMES} (got {self.model!r})"),
            (self.lr_schedule in LR_SCHEDULES,
             f"--lr-schedule must be one of {LR_SCHEDULES} (got {self.lr_schedule!r})"),
            (0 <= self.warmup_epochs < self.epochs,
             f"--warmup-epochs must be in [0, --epochs) (got {self.warmup_epochs})"),
            (self.recipe in ("", *RECIPES),
             f"--recipe must be one of {tuple(RECIPES)} (got {self.recipe!r})"),
            (bool(self.data), "--data is required"),
        ]
        for ok, message in checks:
            if not ok:
                raise JobError(message)
        if self.extra:
            raise JobError(f"unknown config keys: {', '.join(sorted(self.extra))}")

    @property
    def world_sizes(self) -> range:
        """The worker counts this run may train with (one, unless elastic)."""
        return range(self.min_workers or self.num_workers, self.num_workers + 1)

    @property
    def run_name(self) -> str:
        """The Ray run name: resuming means running again with the same name and storage path.

        Derived from every setting that changes what is trained, so the same command resumes
        its own run and a different command never picks up another run's checkpoints.
        """
        if self.name:
            return self.name
        recipe = {k: getattr(self, k) for k in TRAINING_FIELDS}
        digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.model}-w{self.num_workers}-e{self.epochs}-{digest}"

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}


DEFAULTS = JobConfig(data="-")  # the defaults, for presets


# `--fast`: reach the reference's accuracy sooner (measured: README, `make bench`). A bigger
# per-worker batch means fewer, larger steps and all-reduces; the learning rate grows with the
# square root of the batch (usual for Adam). Fewer steps per epoch need a few more epochs: the
# seed model scored 0.8970 after 10 such epochs and 0.9010 after 12; `make bench`: 0.90 after
# 731 s of training, where the default recipe never reaches it in 10 epochs (1,052 s). On GPUs
# also float16, and XLA with one worker; on CPUs XLA made the step slower.
FAST_BATCH_PER_WORKER = 128
FAST_PATH_GPU = {"mixed_precision": True}
FAST_PATH_ONE_GPU = {**FAST_PATH_GPU, "jit_compile": True}  # XLA: one worker only (see checks)


def fast_path_settings(chosen: dict) -> dict:
    """The fast path's settings, given the ones the user chose (which they do not override)."""
    workers = chosen.get("num_workers", DEFAULTS.num_workers)
    if chosen.get("use_gpu", DEFAULTS.use_gpu):  # few, large steps keep GPUs busy
        return {**RECIPES["large-batch"], **(FAST_PATH_ONE_GPU if workers == 1 else FAST_PATH_GPU)}
    batch_size = chosen.get("batch_size", FAST_BATCH_PER_WORKER * workers)
    lr = DEFAULTS.learning_rate * (batch_size / DEFAULTS.batch_size) ** 0.5
    return {"batch_size": batch_size, "learning_rate": lr, "epochs": FAST_EPOCHS}


# Settings that define the trained model (and therefore the default run name).
TRAINING_FIELDS = (
    "data", "model", "epochs", "num_workers", "batch_size", "learning_rate", "lr_schedule",
    "warmup_epochs", "seed", "use_gpu", "jit_compile", "mixed_precision",
)
FIELD_NAMES = tuple(f.name for f in dataclasses.fields(JobConfig) if f.name != "extra")


def load_config_file(path: str) -> dict:
    """Read a TOML or JSON file of JobConfig fields (dashes or underscores in keys)."""
    p = Path(path)
    try:
        text = p.read_text()
        values = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    except FileNotFoundError:
        raise JobError(f"config file not found: {path}") from None
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise JobError(f"config file {path} is not valid {p.suffix[1:] or 'TOML'}: {e}") from None
    return {k.replace("-", "_"): v for k, v in values.items()}


def build_config(file_values: dict, flag_values: dict) -> JobConfig:
    """Defaults < config file < flags. Unknown keys are rejected by JobConfig."""
    merged = {**file_values, **flag_values}
    known = {k: v for k, v in merged.items() if k in FIELD_NAMES}
    unknown = {k: v for k, v in merged.items() if k not in FIELD_NAMES}
    if known.get("recipe") in RECIPES:  # presets sit between the defaults and the user's values
        known = {**RECIPES[known["recipe"]], **known}
    if known.get("min_workers") and "max_failures" not in known:
        known["max_failures"] = ELASTIC_MAX_FAILURES
    if known.get("fast"):
        known = {**fast_path_settings(known), **known}
    if not known.get("ray_address"):
        known["ray_address"] = os.environ.get("RAY_ADDRESS", "")
    try:
        cfg = JobConfig(**known, extra=unknown)
    except TypeError as e:  # a value of the wrong type from a config file
        raise JobError(f"bad config: {e}") from None
    # `--name retrain-%Y%m%d`: one run per (UTC) day for scheduled jobs; a retry that day resumes.
    now = time.gmtime()
    stamped = {k: time.strftime(v, now) for k in ("name", "output") if "%" in (v := getattr(cfg, k))}
    # Ray workers run in another directory: make local paths absolute, leave URIs alone.
    local = {k: os.path.abspath(stamped.get(k, v))
             for k in ("data", "source", "output", "storage_path", "promote_to")
             if (v := getattr(cfg, k)) and "://" not in v}
    return dataclasses.replace(cfg, **{**stamped, **local})
