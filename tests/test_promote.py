"""Promotion: accept, reject, and a crash mid-promotion that must leave `current` intact."""

import json
import os
import shutil

import pytest

from job.config import JobConfig
from job.promote import promote


def make_run(tmp_path, name, accuracy):
    out = tmp_path / "runs" / name
    (out / "model").mkdir(parents=True, exist_ok=True)
    (out / "model" / "saved_model.pb").write_bytes(name.encode())
    metrics = {"run_name": name, "test_accuracy": accuracy}
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
        os.makedirs(dst)
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
