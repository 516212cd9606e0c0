"""Promotion: accept, reject, repeat, take turns, and crashes that must leave `current` intact."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from job.config import JobConfig
from job.promote import promote
from job.runlock import file_lock
from tests.conftest import REPO


def make_run(tmp_path, name, accuracy, loss=0.3):
    out = tmp_path / "runs" / name
    (out / "model").mkdir(parents=True, exist_ok=True)
    (out / "model" / "saved_model.pb").write_bytes(name.encode())
    metrics = {"run_name": name, "test_accuracy": accuracy, "test_loss": loss,
               "checkpoint": f"/ckpt/{name}/checkpoint_{loss}"}
    (out / "metrics.json").write_text(json.dumps(metrics))
    cfg = JobConfig(data="d", name=name, promote_to=str(tmp_path / "models"), min_accuracy=0.90,
                    max_regression=0.005)
    return cfg, str(out), metrics


def current(tmp_path):
    return json.loads((tmp_path / "models" / "current" / "metrics.json").read_text())


def log(tmp_path):
    lines = (tmp_path / "models" / "promotions.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_first_good_run_is_promoted(tmp_path):
    decision = promote(*make_run(tmp_path, "a", 0.91))
    assert decision["accepted"] and decision["current_accuracy"] is None
    assert current(tmp_path)["run_name"] == "a"
    assert os.path.islink(tmp_path / "models" / "current")


def test_below_the_floor_is_rejected_and_recorded(tmp_path):
    decision = promote(*make_run(tmp_path, "low", 0.85))
    assert not decision["accepted"] and "below the floor 0.9000" in decision["reason"]
    assert not os.path.lexists(tmp_path / "models" / "current")
    assert log(tmp_path)[0]["test_accuracy"] == 0.85


def test_a_worse_run_does_not_replace_the_current_model(tmp_path):
    promote(*make_run(tmp_path, "good", 0.93))
    decision = promote(*make_run(tmp_path, "worse", 0.92))
    assert not decision["accepted"] and decision["current_accuracy"] == 0.93
    assert current(tmp_path)["run_name"] == "good"
    within_margin = promote(*make_run(tmp_path, "close", 0.926))
    assert within_margin["accepted"] and current(tmp_path)["run_name"] == "close"
    assert [d["accepted"] for d in log(tmp_path)] == [True, False, True]


def test_crash_while_copying_leaves_current_intact(tmp_path, monkeypatch):
    promote(*make_run(tmp_path, "good", 0.93))
    before = sorted(os.listdir(tmp_path / "models" / "current" / "model"))

    def copy_then_crash(src, dst, **kwargs):
        os.makedirs(dst, exist_ok=True)
        shutil.copy(os.path.join(src, "metrics.json"), dst)
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copytree", copy_then_crash)
    with pytest.raises(OSError, match="disk full"):
        promote(*make_run(tmp_path, "better", 0.95))
    assert current(tmp_path)["run_name"] == "good"
    assert sorted(os.listdir(tmp_path / "models" / "current" / "model")) == before
    monkeypatch.undo()
    assert promote(*make_run(tmp_path, "better", 0.95))["accepted"]  # a retry cleans up and works
    assert current(tmp_path)["run_name"] == "better"


def releases(tmp_path):
    return sorted(os.listdir(tmp_path / "models" / "releases"))


def test_promoting_the_current_model_again_changes_nothing(tmp_path):
    # A rerun of a finished run, a RayJob retry: the same run's same model.
    promote(*make_run(tmp_path, "nightly", 0.93))
    link = os.readlink(tmp_path / "models" / "current")
    again = promote(*make_run(tmp_path, "nightly", 0.93))
    assert again["accepted"] and "already current" in again["reason"]
    assert os.readlink(tmp_path / "models" / "current") == link
    assert releases(tmp_path) == ["nightly"]


def test_a_new_model_of_the_same_run_never_deletes_the_live_release(tmp_path, monkeypatch):
    promote(*make_run(tmp_path, "nightly", 0.93))
    # The switch fails after the new release is copied: current still points to a whole model.
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError, match="killed"):
        promote(*make_run(tmp_path, "nightly", 0.94, loss=0.25))
    monkeypatch.undo()
    assert current(tmp_path)["test_accuracy"] == 0.93
    assert (tmp_path / "models" / "current" / "model" / "saved_model.pb").exists()
    promote(*make_run(tmp_path, "nightly", 0.94, loss=0.25))
    assert current(tmp_path)["test_accuracy"] == 0.94
    assert os.readlink(tmp_path / "models" / "current") == os.path.join("releases", "nightly.3")
    assert releases(tmp_path) == ["nightly", "nightly.2", "nightly.3"]  # none removed


PROMOTE = ("import sys, json; from tests.test_promote import make_run; from job.promote import promote\n"
           "from pathlib import Path\n"
           "print(json.dumps(promote(*make_run(Path(sys.argv[1]), 'late', 0.95))))")


def test_promotions_into_one_models_dir_take_turns(tmp_path):
    # Another driver's promotion holds the lock: this one waits, then decides on what it left.
    promote(*make_run(tmp_path, "good", 0.93))
    with file_lock(str(tmp_path / "models" / ".promote.lock")):
        waiter = subprocess.Popen([sys.executable, "-c", PROMOTE, str(tmp_path)], cwd=REPO,
                                  stdout=subprocess.PIPE, text=True)
        time.sleep(3)
        assert waiter.poll() is None  # waiting for the lock
        promote(*make_run(tmp_path, "better", 0.96))  # the holder's own promotion (same process)
    decision = json.loads(waiter.communicate(timeout=60)[0])
    assert decision["current_accuracy"] == 0.96  # decided after the holder's switch
    assert not decision["accepted"] and current(tmp_path)["run_name"] == "better"


def rollback_cli(models, *args):
    return subprocess.run([sys.executable, "-m", "job", "rollback", "--models", str(models), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_each_accepted_model_becomes_the_next_serving_version(tmp_path):
    promote(*make_run(tmp_path, "a", 0.91))
    promote(*make_run(tmp_path, "low", 0.50))  # rejected: no version
    promote(*make_run(tmp_path, "b", 0.92))
    serving = tmp_path / "models" / "serving"
    assert sorted(os.listdir(serving)) == ["1", "2"]  # nothing half-written beside them
    assert (serving / "1" / "saved_model.pb").read_bytes() == b"a"
    assert (serving / "2" / "saved_model.pb").read_bytes() == b"b"
    assert [d.get("serving_version") for d in log(tmp_path)] == [1, None, 2]


def test_a_rollback_puts_the_earlier_release_back_everywhere(tmp_path):
    promote(*make_run(tmp_path, "a", 0.91))
    promote(*make_run(tmp_path, "b", 0.92))
    models = tmp_path / "models"
    r = rollback_cli(models)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{models}/current is a again (test accuracy 0.9100; serving version 3)")
    assert current(tmp_path)["run_name"] == "a"
    assert (models / "serving" / "3" / "saved_model.pb").read_bytes() == b"a"  # the highest: a
    last = log(tmp_path)[-1]
    assert last["rollback"] and last["release"] == "a" and last["reason"] == "rollback from b"
    assert rollback_cli(models).returncode == 0  # the one before that: b, as version 4
    assert current(tmp_path)["run_name"] == "b"
    r = rollback_cli(models, "--to", "nope")
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {models}/releases/nope: no such release (or it holds no model)"
    assert current(tmp_path)["run_name"] == "b"


def test_with_no_earlier_release_a_rollback_says_so(tmp_path):
    promote(*make_run(tmp_path, "a", 0.91))
    r = rollback_cli(tmp_path / "models")
    assert r.returncode == 2 and "no earlier release in promotions.jsonl" in r.stderr
    assert current(tmp_path)["run_name"] == "a"
