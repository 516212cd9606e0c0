"""Offline checks of k8s/: schemas (Kubernetes + vendored KubeRay v1.7.0 CRDs), security, wiring."""

from __future__ import annotations

import functools
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from cluster import render_k8s
from job.cli import make_parser
from job.config import build_config
from tests.conftest import pinned_ray_version

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
CRDS = Path(__file__).parent / "schemas" / "kuberay-crds-v1.7.0"
K8S_VERSIONS = ["1.29.0", "1.33.0"]  # oldest supported and a current release


def documents(paths):
    return [(p.name, doc) for p in paths for doc in yaml.safe_load_all(p.read_text()) if doc]


APPLIED = documents(sorted(K8S.glob("*.yaml")))  # what `kubectl apply -f k8s/` applies
CONFIGMAP = next(doc for _, doc in APPLIED if doc["kind"] == "ConfigMap")
TEMPLATE = yaml.safe_load(CONFIGMAP["data"]["rayjob.yaml"])  # the RayJob the CronJob creates
VARIANTS = documents(sorted((K8S / "variants").glob("*.yaml")))
ALL = APPLIED + VARIANTS + [("configmap:rayjob.yaml", TEMPLATE)]


def strict(schema: dict) -> dict:
    """Reject unknown fields, as `kubectl apply` (server-side field validation) does."""
    if isinstance(schema, dict):
        if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
        for value in schema.values():
            if isinstance(value, dict):
                strict(value)
    return schema


@functools.cache
def crd_schema(kind: str) -> dict:
    for path in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] == kind:
            version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
            schema = strict(version["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = {"type": "object"}  # checked by the API server
            return schema
    raise KeyError(kind)


def pod_specs(doc: dict) -> list[dict]:
    """Every pod spec in a manifest, wherever the kind keeps it."""
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    if kind == "RayCronJob":
        spec = spec["jobTemplate"]
    if kind in ("RayJob", "RayCronJob"):
        cluster = spec["rayClusterSpec"]
        return ([spec["submitterPodTemplate"]["spec"], cluster["headGroupSpec"]["template"]["spec"]]
                + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]])
    return []


def rayjob_specs():
    for name, doc in ALL:
        if doc["kind"] == "RayJob":
            yield name, doc["spec"]
        elif doc["kind"] == "RayCronJob":
            yield name, doc["spec"]["jobTemplate"]


@pytest.mark.parametrize("name,doc", ALL, ids=[n for n, _ in ALL])
def test_every_manifest_validates_against_its_schema(name, doc):
    if doc["apiVersion"].startswith("ray.io/"):
        jsonschema.validate(doc, crd_schema(doc["kind"]))
    else:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_apply_order_and_namespace():
    names = [n for n, _ in APPLIED]
    assert names == sorted(names) and APPLIED[0][1]["kind"] == "Namespace"
    namespace = APPLIED[0][1]["metadata"]["name"]
    assert APPLIED[0][1]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for name, doc in ALL[1:]:
        assert doc["metadata"]["namespace"] == namespace, name
    assert {d["kind"] for _, d in APPLIED} == {
        "Namespace", "ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim",
        "ConfigMap", "NetworkPolicy", "CronJob"}
    assert all(len(d) == 1 for d in map(lambda p: list(yaml.safe_load_all(p.read_text())),
                                        K8S.glob("*.yaml"))), "one object per file"


def test_generated_manifests_are_up_to_date():
    for path, text in render_k8s.rendered().items():
        assert path.read_text() == text, f"{path} is stale: run python cluster/render_k8s.py"


@pytest.mark.parametrize("name,doc", [(n, d) for n, d in ALL if pod_specs(d)],
                         ids=[n for n, d in ALL if pod_specs(d)])
def test_every_pod_meets_restricted_pod_security(name, doc):
    for pod in pod_specs(doc):
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
            assert not sc.get("privileged"), c["name"]
            assert c["resources"]["requests"] == c["resources"]["limits"], c["name"]
            for env in c.get("env", []):
                assert "TOKEN" not in env["name"] or "value" not in env, "no inline secrets"


def test_rayjob_runs_gpu_workers_with_token_auth_and_cleans_up():
    for name, spec in rayjob_specs():
        cluster = spec["rayClusterSpec"]
        assert cluster["authOptions"]["mode"] == "token", name
        assert "serviceType" not in cluster["headGroupSpec"], "dashboard stays ClusterIP"
        for group in cluster["workerGroupSpecs"]:
            for c in group["template"]["spec"]["containers"]:
                assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert spec["shutdownAfterJobFinishes"] is True
        assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
    assert len(TEMPLATE["metadata"]["generateName"]) + 5 <= 47  # RayJob names are <= 47 chars


def test_cronjob_creates_one_rayjob_at_a_time_with_bounded_history():
    cron = next(d for _, d in APPLIED if d["kind"] == "CronJob")["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    assert cron["successfulJobsHistoryLimit"] >= 1 and cron["failedJobsHistoryLimit"] >= 1
    container = cron["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["create", "-f", "/etc/fashion/rayjob.yaml"]
    role = next(d for _, d in APPLIED if d["kind"] == "Role")
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create"]}]


def test_entrypoint_is_accepted_by_the_jobs_own_cli():
    job_toml = tomllib.loads(CONFIGMAP["data"]["job.toml"])
    for name, spec in rayjob_specs():
        commands = [shlex.split(c) for c in spec["entrypoint"].split("&&")]
        assert [c[:3] for c in commands] == [["python", "-m", "job"]] * 2, name
        prepare, train = (vars(make_parser().parse_args(c[3:])) for c in commands)
        assert prepare["command"] == "prepare-data" and prepare["out"] == job_toml["data"]
        train.pop("command")
        train.pop("config")
        cfg = build_config(job_toml, train)
        assert cfg.use_gpu and cfg.run_name.startswith("retrain-") and "%" not in cfg.output
        workers = spec["rayClusterSpec"]["workerGroupSpecs"][0]
        assert workers["replicas"] == workers["minReplicas"] == cfg.num_workers


def test_ray_version_matches_image_tag_and_pin():
    pin = pinned_ray_version()
    dockerfile = (REPO / "k8s" / "image" / "Dockerfile").read_text()
    assert re.search(r"ARG RAY_VERSION=([\d.]+)", dockerfile).group(1) == pin
    for name, spec in rayjob_specs():
        cluster = spec["rayClusterSpec"]
        assert cluster["rayVersion"] == pin, name
        pods = pod_specs({"kind": "RayJob", "spec": spec})
        for image in {c["image"] for pod in pods for c in pod["containers"]}:
            assert image.split(":")[1].startswith(pin + "-"), image


def test_volumes_are_shared_read_write_many():
    claims = {d["metadata"]["name"]: d for _, d in APPLIED if d["kind"] == "PersistentVolumeClaim"}
    assert set(claims) == {"fashion-data", "fashion-checkpoints", "fashion-models"}
    assert all(c["spec"]["accessModes"] == ["ReadWriteMany"] for c in claims.values())
    used = {v["persistentVolumeClaim"]["claimName"]
            for pod in pod_specs(TEMPLATE) for v in pod.get("volumes", [])
            if "persistentVolumeClaim" in v}
    assert used == set(claims)
