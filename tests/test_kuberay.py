"""Every RayJob in k8s/, run the way KubeRay v1.7.0 runs it (tests/kuberay.py), on a real local
multi-node Ray cluster with token auth (all of them yield one submitter command, checked first).

The pods' volumes are directories under one root: ConfigMap keys written as files (job.toml cut
to a short CPU run), each PVC a directory, the image's /opt/fashion-mnist the official IDX files.
The entrypoint and job.toml name those directories instead of the mount paths. The submitter
pod sees none of them (a private mount namespace hides the root), as on Kubernetes.
"""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO, SMALL, can_unshare_mounts, ray_job
from tests.kuberay import (
    job_submit_command,
    random_suffix,
    ray_job_status,
    run_submitter_job,
)
from tests.test_k8s import CONFIGMAP, rayjob_specs, render

pytestmark = pytest.mark.slow
IMAGE_IDX_DIR = "/opt/fashion-mnist"  # where k8s/image/Dockerfile puts the official IDX files
# A short CPU run of the scheduled recipe: what differs from k8s/job.toml.
CPU_SETTINGS = {"use_gpu": False, "cpus_per_worker": 1, "model": "seed", "epochs": 2, "batch_size": 16,
                "min_accuracy": 0.2}
RAYJOBS = dict(rayjob_specs())


class Pods:
    """The volumes of one RayJob's pods, as local directories under `root`."""

    def __init__(self, root: Path, source_dir: str, spec: dict):
        self.root, self.spec = root, spec
        head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        volumes = {v["name"]: v for v in head["volumes"]}
        self.paths = {IMAGE_IDX_DIR: source_dir}
        for mount in head["containers"][0]["volumeMounts"]:
            volume = volumes[mount["name"]]
            if "configMap" in volume:
                assert volume["configMap"]["name"] == CONFIGMAP["metadata"]["name"]
                local = root / mount["name"]
            elif "persistentVolumeClaim" in volume:
                local = root / volume["persistentVolumeClaim"]["claimName"]
            else:
                continue  # an emptyDir (/tmp): the pod's scratch space; local Ray has its own
            local.mkdir(parents=True, exist_ok=True)
            self.paths[mount["mountPath"]] = str(local)
        assert Path(REPO, "k8s/image/Dockerfile").read_text().count(IMAGE_IDX_DIR) >= 1
        self.configure()

    def local(self, text: str) -> str:
        """Mount paths in `text` replaced by their directories here."""
        for mount in sorted(self.paths, key=len, reverse=True):
            text = re.sub(rf"(?<![\w/]){re.escape(mount)}(?=/|\b|$)", self.paths[mount], text)
        return text

    def configure(self, **settings) -> None:
        """Write the ConfigMap's keys as files: job.toml with CPU_SETTINGS and `settings`."""
        config_dir = Path(self.paths["/etc/fashion"])
        for key, text in CONFIGMAP["data"].items():
            (config_dir / key).write_text(text)
        job = tomllib.loads(CONFIGMAP["data"]["job.toml"]) | CPU_SETTINGS | settings
        lines = [f"{k} = {json.dumps(self.local(v) if isinstance(v, str) else v)}" for k, v in job.items()]
        (config_dir / "job.toml").write_text("\n".join(lines) + "\n")

    def seed_data(self, small_data: str) -> Path:
        """The data volume holding the small real dataset (retrain then uses it as it is)."""
        data = Path(self.local("/mnt/data/fashion-mnist"))
        shutil.copytree(small_data, data)
        return data

    def models(self) -> Path:
        return Path(self.paths["/mnt/models"])

    def submit(self, cluster, job_id: str | None = None, entrypoint: str | None = None):
        """Create the RayJob: the submitter Job runs; returns (job_id, pods, Ray status)."""
        spec = {**self.spec, "entrypoint": self.local(entrypoint or self.spec["entrypoint"])}
        job_id = job_id or f"fashion-retrain-{random_suffix()}-{random_suffix()}"
        pods = run_submitter_job(spec, cluster, job_id, hide=self.root if can_unshare_mounts() else None)
        status = ray_job_status(cluster, job_id)
        return job_id, pods, status


def trained_runs(models: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in models.glob("runs/*/metrics.json")}


def promotions(models: Path) -> list[dict]:
    path = models / "promotions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def check_trained_as_the_ray_job(cluster, pods: Pods, job_id, submitters, status) -> dict:
    logs = ray_job(cluster, "logs", job_id).stdout
    assert submitters[-1].returncode == 0 and len(submitters) == 1, submitters[-1].stderr[-3000:]
    assert status == "SUCCEEDED", logs[-3000:]  # the Ray job's own status
    [(run_name, metrics)] = trained_runs(pods.models()).items()
    assert run_name.startswith("retrain-") and metrics["epochs_completed"] == CPU_SETTINGS["epochs"]
    assert metrics["config"]["model"] == "seed" and metrics["num_workers"] == 2
    # The driver's lines are in the Ray job's own logs: it ran as the Ray job, not in the submitter.
    assert f"[{run_name}] test accuracy" in logs
    return metrics


def test_every_rayjob_in_k8s_gets_the_same_submitter_command():
    """The operator's submitter command is a function of the RayJob's spec: the CronJob's
    template, the variants/ RayJob and the RayCronJob's jobTemplate yield the same command, so
    running it once (the tests below) runs every one of them."""
    assert set(RAYJOBS) == {"configmap:rayjob.yaml", "ray-job.train-now.yaml",
                            "ray-cronjob.nightly.yaml", "ray-job.fresh-now.yaml"}
    commands = {name: job_submit_command(spec, "head-svc:8265", "fashion-retrain-abcde-fghij")
                for name, spec in RAYJOBS.items()}
    # The fresh run's only difference: the run of its own it names (tests/test_k8s.py).
    commands["ray-job.fresh-now.yaml"] = commands["ray-job.fresh-now.yaml"].replace(
        render.FRESH_FLAGS, "", 1)
    assert len(set(commands.values())) == 1, commands
    command = commands["configmap:rayjob.yaml"]
    assert command.count(" -- python -m job retrain --config /etc/fashion/job.toml ; fi ; ") == 1


def test_scheduled_rayjob_trains_once_retries_idle_and_gates_promotion(
        cluster, small_data, source_dir, tmp_path):
    """The RayJob the CronJob creates: trains once, a retry of its submitter does not train
    again, the run becomes `current`; a worse run the next night leaves `current` alone."""
    pods = Pods(tmp_path / "pods", source_dir, RAYJOBS["configmap:rayjob.yaml"])
    pods.seed_data(small_data)
    job_id, *outcome = pods.submit(cluster)
    first = check_trained_as_the_ray_job(cluster, pods, job_id, *outcome)
    current = pods.models() / "current"
    assert current.resolve().name == first["run_name"] and promotions(pods.models())[0]["accepted"]

    metrics_file = pods.models() / "runs" / first["run_name"] / "metrics.json"
    before = metrics_file.read_bytes()
    _, retry, status = pods.submit(cluster, job_id=job_id)  # the submitter pod again
    assert retry[-1].returncode == 0 and len(retry) == 1 and status == "SUCCEEDED"
    assert metrics_file.read_bytes() == before and len(promotions(pods.models())) == 1

    # Next night, a broken recipe (a learning rate that learns nothing): trained, not promoted,
    # and the RayJob fails.
    pods.configure(name="retrain-broken", output="/mnt/models/runs/retrain-broken", learning_rate=1e-9)
    _, submitters, status = pods.submit(cluster)
    assert status == "FAILED"  # a rejected model fails the night (exit 3), so alerting fires
    worse = json.loads((pods.models() / "runs/retrain-broken/metrics.json").read_text())
    assert worse["test_accuracy"] < first["test_accuracy"] - first["config"]["max_regression"]
    decision = promotions(pods.models())[-1]
    assert decision["run_name"] == "retrain-broken" and decision["accepted"] is False
    assert current.resolve().name == first["run_name"]


def test_a_rayjob_whose_training_fails_never_ends_succeeded(cluster, small_data, source_dir, tmp_path):
    pods = Pods(tmp_path / "pods", source_dir, RAYJOBS["configmap:rayjob.yaml"])
    data = pods.seed_data(small_data)
    shard = sorted((data / "train").glob("*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a damaged shard
    job_id, submitters, status = pods.submit(cluster)
    logs = ray_job(cluster, "logs", job_id).stdout
    assert status == "FAILED", logs[-3000:]
    assert re.search(r"error: (training failed: )?.*(corrupt|truncated) shard", logs), logs[-3000:]
    assert not trained_runs(pods.models()) and not (pods.models() / "current").exists()


@pytest.mark.skipif(not can_unshare_mounts(), reason="needs a private mount namespace (root)")
def test_an_entrypoint_split_by_the_shell_would_end_succeeded_without_training(
        cluster, small_data, source_dir, tmp_path):
    """Why the entrypoint is one command: the old `prepare-data ... && train ...` under KubeRay's
    `bash -ce` line submits only prepare-data; train runs in the submitter pod and fails there;
    the retried submitter pod follows prepare-data's logs; the RayJob ends Complete, untrained."""
    pods = Pods(tmp_path / "pods", source_dir, RAYJOBS["configmap:rayjob.yaml"])
    pods.seed_data(small_data)
    split = (f"python -m job prepare-data --source {IMAGE_IDX_DIR} --out /mnt/data/fashion-mnist "
             f"--limit {SMALL} --shards 4 && python -m job retrain --config /etc/fashion/job.toml")
    job_id, submitters, status = pods.submit(cluster, entrypoint=split)
    assert "config file not found" in submitters[0].stderr
    assert len(submitters) == 2 and submitters[-1].returncode == 0
    assert status == "SUCCEEDED"  # the Ray job's own status, as the submitter pod saw it
    assert not trained_runs(pods.models())
