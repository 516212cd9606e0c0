import json
import os
import time

import pytest

from job.cli import main
from job.config import (
    ELASTIC_MAX_FAILURES,
    FAST_BATCH_PER_WORKER,
    FAST_EPOCHS,
    JobConfig,
    JobError,
    build_config,
    load_config_file,
)


def test_defaults_train_the_reference_model_as_long_and_the_reference_recipe_is_the_notebook():
    cfg = build_config({}, {"data": "d"})
    assert (cfg.epochs, cfg.batch_size, cfg.num_workers, cfg.model) == (10, 64, 2, "seed")
    assert (cfg.learning_rate, cfg.lr_schedule, cfg.warmup_epochs, cfg.flips) == (4e-3, "cosine", 1, False)
    reference = build_config({}, {"data": "d", "recipe": "reference"})
    assert (reference.epochs, reference.batch_size, reference.model, reference.learning_rate,
            reference.lr_schedule, reference.warmup_epochs, reference.adam_beta2, reference.flips) == (
        10, 64, "seed", 1e-3, "constant", 0, 0.999, False)


def test_a_warm_up_the_user_did_not_ask_for_fits_a_shorter_run():
    assert build_config({}, {"data": "d", "epochs": 1}).warmup_epochs == 0
    assert build_config({}, {"data": "d", "epochs": 2}).warmup_epochs == 1
    with pytest.raises(JobError, match="--warmup-epochs must be in"):
        build_config({}, {"data": "d", "epochs": 1, "warmup_epochs": 1})


@pytest.mark.parametrize("field,value,message", [
    ("epochs", 0, "--epochs must be >= 1"),
    ("epochs", -3, "--epochs must be >= 1"),
    ("num_workers", 0, "--num-workers must be >= 1"),
    ("batch_size", 63, "must divide evenly across 2 worker"),
    ("min_workers", 3, r"--min-workers 3 must be in \[1, --num-workers 2\]"),
    ("learning_rate", 0.0, "--learning-rate must be > 0"),
    ("adam_beta2", 1.0, "--adam-beta2 must be in"),
    ("model", "resnet", "--model must be one of"),
    ("grad_compression", "int8", "--grad-compression must be one of"),
    ("all_reduce_pack_mb", -1.0, "--all-reduce-pack-mb must be >= 0"),
    ("max_failures", -2, "--max-failures must be >= -1"),
    ("mixed_precision", True, "--mixed-precision needs --use-gpu"),
    ("jit_compile", True, "--jit-compile works with --num-workers 1 only"),
    ("min_accuracy", 1.5, "--min-accuracy must be in"),
])
def test_bad_values_are_rejected_with_the_flag_named(field, value, message):
    with pytest.raises(JobError, match=message):
        JobConfig(data="d", **{field: value})


def test_an_elastic_batch_must_divide_across_every_size_the_run_may_have():
    assert list(JobConfig(data="d", num_workers=4, min_workers=2, batch_size=48).world_sizes) == [2, 3, 4]
    with pytest.raises(JobError, match="must divide evenly across 3 worker"):
        JobConfig(data="d", num_workers=4, min_workers=2, batch_size=64)


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        JobConfig(data="d").epochs = 3


def test_flags_override_the_config_file(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('data = "from-file"\nepochs = 3\nnum-workers = 1\nbatch-size = 32\n')
    cfg = build_config(load_config_file(str(path)), {"epochs": 5})
    assert (cfg.epochs, cfg.num_workers, cfg.batch_size) == (5, 1, 32)
    assert cfg.data == os.path.abspath("from-file")  # workers run elsewhere: paths are absolute


def test_uris_stay_uris_and_strftime_codes_are_expanded():
    cfg = build_config({}, {"data": "s3://bucket/fm", "name": "retrain-%Y", "output": "runs/%Y"})
    year = time.strftime("%Y", time.gmtime())
    assert cfg.data == "s3://bucket/fm"
    assert cfg.run_name == f"retrain-{year}" and cfg.output == os.path.abspath(f"runs/{year}")


def test_json_config_files_work_and_unknown_keys_are_rejected(tmp_path):
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"data": "d", "epoch": 3}))
    with pytest.raises(JobError, match="unknown config keys: epoch"):
        build_config(load_config_file(str(path)), {})


def test_run_name_follows_the_training_recipe_only():
    base = JobConfig(data="d")
    assert base.run_name == JobConfig(data="d", output="elsewhere", max_failures=3).run_name
    assert base.run_name != JobConfig(data="d", learning_rate=1e-4).run_name
    assert base.run_name != JobConfig(data="d", epochs=3).run_name
    assert JobConfig(data="d", name="mine").run_name == "mine"


def test_cli_rejects_bad_epochs_in_one_line(capsys, small_data, tmp_path):
    assert main(["train", "--data", small_data, "--epochs", "0", "--output", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == "error: --epochs must be >= 1 (got 0)\n"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags,message", [
    (["--num-workers", "2", "--min-workers", "3"], "--min-workers 3 must be in [1, --num-workers 2]"),
    (["--num-workers", "3", "--batch-size", "48"],
     "3 worker(s) cannot share the 4 train shards of {data} evenly: use worker counts that divide "
     "4, or rerun prepare-data with --shards a multiple of 3"),
    (["--num-workers", "4", "--min-workers", "3", "--batch-size", "64"],
     "--batch-size 64 (global) must divide evenly across 3 worker(s), a size the run may have"),
    # an epoch of 0 steps (960 train, 240 val images in 4 shards each), refused before Ray starts
    (["--batch-size", "2048"], "--batch-size 2048 takes 512 images a step from each train shard "
     "of {data}, whose smallest holds 240: not one step; use --batch-size <= 960"),
    (["--batch-size", "256"], "--batch-size 256 takes 64 images a step from each val shard of "
     "{data}, whose smallest holds 60: not one step; use --batch-size <= 240"),
])
def test_cli_refuses_worker_counts_the_partitions_cannot_serve(capsys, small_data, tmp_path, flags,
                                                               message):
    out = str(tmp_path / "o")
    assert main(["train", "--data", small_data, "--output", out, *flags]) == 2
    assert capsys.readouterr().err == f"error: {message.format(data=small_data)}\n"
    assert not (tmp_path / "o").exists()


def test_cli_reports_a_missing_config_file(capsys):
    assert main(["train", "--config", "/nonexistent.toml"]) == 2
    assert "config file not found: /nonexistent.toml" in capsys.readouterr().err


def test_fast_path_on_cpu_is_a_bigger_batch_with_a_scaled_learning_rate():
    cfg = build_config({}, {"data": "d", "fast": True, "num_workers": 2})
    batch = FAST_BATCH_PER_WORKER * 2
    assert batch > JobConfig(data="d").batch_size
    assert (cfg.batch_size, cfg.jit_compile, cfg.mixed_precision) == (batch, False, False)
    assert cfg.learning_rate == pytest.approx(1e-3 * (batch / 64) ** 0.5)  # the reference's, scaled
    assert (cfg.lr_schedule, cfg.warmup_epochs) == ("constant", 0)
    assert cfg.epochs == FAST_EPOCHS  # fewer steps per epoch, a few more epochs
    assert cfg.run_name != build_config({}, {"data": "d"}).run_name


def test_fast_path_on_gpus_is_the_large_batch_recipe_with_float16_and_xla_only_for_one_worker():
    cfg = build_config({}, {"data": "d", "fast": True, "use_gpu": True, "num_workers": 4})
    large_batch = build_config({}, {"data": "d", "recipe": "large-batch"})
    assert (cfg.batch_size, cfg.learning_rate, cfg.lr_schedule, cfg.epochs) == (
        large_batch.batch_size, large_batch.learning_rate, large_batch.lr_schedule, large_batch.epochs)
    assert (cfg.jit_compile, cfg.mixed_precision) == (False, True)
    one = build_config({}, {"data": "d", "fast": True, "use_gpu": True, "num_workers": 1})
    assert (one.jit_compile, one.mixed_precision) == (True, True)


def test_xla_is_refused_for_more_than_one_worker_on_any_device():
    for use_gpu in (False, True):
        with pytest.raises(JobError, match="--jit-compile works with --num-workers 1 only"):
            build_config({}, {"data": "d", "jit_compile": True, "use_gpu": use_gpu, "num_workers": 2})


def test_the_users_own_values_beat_the_fast_path(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('fast = true\nbatch-size = 128\n')
    cfg = build_config(load_config_file(str(path)), {"data": "d", "learning_rate": 5e-4, "epochs": 3})
    assert (cfg.batch_size, cfg.learning_rate, cfg.epochs) == (128, 5e-4, 3)
    assert build_config({}, {"data": "d", "fast": True, "batch_size": 64}).learning_rate == 1e-3


def test_large_batch_recipe_is_a_preset_the_users_values_beat():
    cfg = build_config({}, {"data": "d", "recipe": "large-batch"})
    assert (cfg.batch_size, cfg.learning_rate, cfg.lr_schedule, cfg.warmup_epochs, cfg.adam_beta2,
            cfg.epochs) == (1024, 2e-2, "cosine", 1, 0.99, 10)
    assert cfg.epochs * (48_000 // cfg.batch_size) <= 470  # optimizer steps: 1/16 of the reference
    assert build_config({}, {"data": "d", "recipe": "large-batch", "epochs": 12}).epochs == 12
    assert cfg.run_name != build_config({}, {"data": "d"}).run_name
    with pytest.raises(JobError, match="--recipe must be one of"):
        build_config({}, {"data": "d", "recipe": "huge"})
    with pytest.raises(JobError, match="--warmup-epochs must be in"):
        build_config({}, {"data": "d", "warmup_epochs": 10, "epochs": 10})


def test_an_elastic_run_survives_lost_nodes_by_default():
    # Ray Train charges a lost node to max_failures, whose default (0) would end the run there.
    assert build_config({}, {"data": "d", "min_workers": 1}).max_failures == ELASTIC_MAX_FAILURES
    assert build_config({}, {"data": "d", "min_workers": 1, "max_failures": 0}).max_failures == 0
    assert build_config({}, {"data": "d"}).max_failures == 0  # a fixed size: fail fast
