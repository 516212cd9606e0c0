"""Offline checks of k8s/: schemas (Kubernetes + vendored KubeRay v1.7.0 CRDs), security, wiring."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import re
import shlex
import time
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from job.cli import make_parser
from job.config import build_config
from tests.conftest import pinned_ray_version
from tests.kuberay import RAYJOB_ENDS, cluster_deleted_after

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
_spec = importlib.util.spec_from_file_location("render", K8S / "render.py")  # k8s/ is no package
render = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render)
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
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    for path in CRDS.glob(f"ray.io_{kind.lower()}s.yaml"):
        crd = yaml.load(path.read_text(), Loader=yaml.CSafeLoader)  # libyaml: the CRDs are big
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schema = strict(version["schema"]["openAPIV3Schema"])
        schema["properties"]["metadata"] = {"type": "object"}  # checked by the API server
        validator = jsonschema.validators.validator_for(schema)
        validator.check_schema(schema)
        return validator(schema)
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
        crd_validator(doc["kind"]).validate(doc)
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
    for path, text in render.rendered().items():
        assert path.read_text() == text, f"{path} is stale: run python k8s/render.py"


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
            requests, limits = c["resources"]["requests"], c["resources"]["limits"]
            assert requests.keys() == limits.keys(), c["name"]
            assert requests["memory"] == limits["memory"], c["name"]  # no OOM kill under pressure
            for env in c.get("env", []):
                assert "TOKEN" not in env["name"] or "value" not in env, "no inline secrets"


def quantity(value: str) -> float:
    """A Kubernetes quantity ("500m", "1", "256Mi", "1Gi") as a number."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    number, unit = re.fullmatch(r"([\d.]+)(m|Ki|Mi|Gi)?", str(value)).groups()
    return float(number) * units.get(unit, 1)


def test_rayjob_runs_gpu_workers_with_token_auth_and_cleans_up():
    for name, spec in rayjob_specs():
        cluster = spec["rayClusterSpec"]
        assert cluster["authOptions"]["mode"] == "token", name
        assert "serviceType" not in cluster["headGroupSpec"], "dashboard stays ClusterIP"
        for group in cluster["workerGroupSpecs"]:
            for c in group["template"]["spec"]["containers"]:
                assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert spec["activeDeadlineSeconds"] > 0 and spec["preRunningDeadlineSeconds"] > 0
        # Every end, a stopped Ray job's too, deletes the GPU cluster soon (the operator's rule).
        for end in RAYJOB_ENDS:
            ttl = cluster_deleted_after(spec, *end)
            assert ttl == 600, (name, end, ttl)  # 10 min to read logs (docs/kubernetes.md: clean-up)
        # The submitter follows the logs for hours: at least KubeRay's default (1 CPU, 1Gi).
        submitter = spec["submitterPodTemplate"]["spec"]["containers"][0]["resources"]["limits"]
        assert quantity(submitter["cpu"]) >= 1 and quantity(submitter["memory"]) >= 2**30
    assert len(TEMPLATE["metadata"]["generateName"]) + 5 <= 47  # RayJob names are <= 47 chars


def test_cronjob_creates_one_rayjob_at_a_time_with_bounded_history():
    cron = next(d for _, d in APPLIED if d["kind"] == "CronJob")["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    assert cron["successfulJobsHistoryLimit"] >= 1 and cron["failedJobsHistoryLimit"] >= 1
    container = cron["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["create", "-f", "/etc/fashion/rayjob.yaml"]
    # kubectl loads the ray.io OpenAPI document (~1 MB of CRDs) to create a RayJob.
    assert quantity(container["resources"]["limits"]["memory"]) >= 256 * 2**20
    role = next(d for _, d in APPLIED if d["kind"] == "Role")
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create"]}]


def test_entrypoint_is_one_command_of_the_jobs_own_cli():
    """KubeRay pastes the entrypoint raw into `bash -ce '... -- ENTRYPOINT ; fi ; ...'`: any shell
    operator would split it (tests/test_kuberay.py runs it the way the operator does)."""
    job_toml = tomllib.loads((K8S / "job.toml").read_text())
    runs = {}
    for name, spec in rayjob_specs():
        entrypoint = spec["entrypoint"]
        assert not re.search(r"[;&|<>`$(){}\n]", entrypoint), (name, entrypoint)
        command = shlex.split(entrypoint)
        assert command[:3] == ["python", "-m", "job"], name
        flags = vars(make_parser().parse_args(command[3:]))
        assert flags.pop("command") == "retrain" and flags.pop("config") == "/etc/fashion/job.toml"
        cfg = runs[name] = build_config(job_toml, flags)
        assert cfg.use_gpu and cfg.output == f"/mnt/models/runs/{cfg.run_name}"
        assert cfg.promote_to and cfg.source, "the nightly run prepares its data and passes the gate"
        workers = spec["rayClusterSpec"]["workerGroupSpecs"][0]
        assert workers["replicas"] == workers["maxReplicas"] == cfg.num_workers
        assert workers["minReplicas"] == cfg.world_sizes[0]
        pod_cpus = workers["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]
        assert cfg.cpus_per_worker == quantity(pod_cpus), "TensorFlow gets all of its pod's CPUs"
        # the deadline only marks the RayJob Failed and counts cluster bring-up: the budget stops
        # training first in the worst case, with 10 min left to evaluate
        assert 0 < cfg.time_budget <= (spec["activeDeadlineSeconds"]
                                       - spec.get("preRunningDeadlineSeconds", 0) - 600), name
    assert CONFIGMAP["data"]["job.toml"] == (K8S / "job.toml").read_text()
    # The night's run is the day's (a retry resumes it); the fresh one is a run of its own minute,
    # trained with the same settings.
    fresh = runs.pop("ray-job.fresh-now.yaml")
    assert {cfg.run_name for cfg in runs.values()} == {time.strftime("retrain-%Y%m%d", time.gmtime())}
    assert re.fullmatch(r"now-\d{8}T\d{4}Z", fresh.run_name), fresh.run_name
    night = runs["configmap:rayjob.yaml"]
    assert dataclasses.replace(fresh, name=night.name, output=night.output) == night


def test_ray_version_matches_image_tag_and_pin():
    pin = pinned_ray_version()
    dockerfile = (REPO / "k8s" / "image" / "Dockerfile").read_text()
    assert re.search(r"ARG RAY_VERSION=([\d.]+)", dockerfile).group(1) == pin
    for name, spec in rayjob_specs():
        cluster = spec["rayClusterSpec"]
        assert cluster["rayVersion"] == pin, name
        pods = pod_specs({"kind": "RayJob", "spec": spec})
        for image in {c["image"] for pod in pods for c in pod["containers"]}:
            assert image.rsplit(":", 1)[1].startswith(pin + "-"), image


def test_volumes_are_shared_read_write_many():
    claims = {d["metadata"]["name"]: d for _, d in APPLIED if d["kind"] == "PersistentVolumeClaim"}
    assert set(claims) == {"fashion-data", "fashion-checkpoints", "fashion-models"}
    assert all(c["spec"]["accessModes"] == ["ReadWriteMany"] for c in claims.values())
    used = {v["persistentVolumeClaim"]["claimName"]
            for pod in pod_specs(TEMPLATE) for v in pod.get("volumes", [])
            if "persistentVolumeClaim" in v}
    assert used == set(claims)


def test_one_image_one_storage_class_one_operator_namespace():
    """`make k8s-render IMAGE=... STORAGE_CLASS=... OPERATOR_NAMESPACE=...` sets each in one go."""
    for setting in render.SETTINGS:
        assert len(render.current(setting)) == 1, setting
    images = {c["image"] for _, doc in ALL if doc["kind"] != "CronJob"
              for pod in pod_specs(doc) for c in pod["containers"]}
    assert images == render.current("image")
    claims = [d for _, d in APPLIED if d["kind"] == "PersistentVolumeClaim"]
    assert {c["spec"]["storageClassName"] for c in claims} == render.current("storage_class")


def test_only_the_operator_in_its_own_namespace_reaches_the_dashboard():
    policy = next(d for _, d in APPLIED if d["kind"] == "NetworkPolicy")["spec"]
    other_namespaces = [(rule, peer) for rule in policy["ingress"] for peer in rule["from"]
                        if "namespaceSelector" in peer]
    assert len(other_namespaces) == 1, other_namespaces  # the operator's, and only that one
    [(rule, peer)] = other_namespaces
    # never "any namespace": pinned by name, and to the operator's pods in it
    name = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
    assert {name} == render.current("operator_namespace")
    assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}
    assert rule["ports"] == [{"protocol": "TCP", "port": 8265}]


def test_the_deletion_rule_reading_tells_apart_what_deletes_a_stopped_jobs_cluster():
    # The operator's rule as read (tests/kuberay.py) on the specs the old manifests had: the
    # deletionRules matched no STOPPED job, so its GPU cluster stayed for ever.
    old_rules = {"deletionStrategy": {"deletionRules": [
        {"policy": "DeleteCluster", "condition": {"jobStatus": s, "ttlSeconds": 600}}
        for s in ("SUCCEEDED", "FAILED")]}}
    assert cluster_deleted_after(old_rules, "Complete", "SUCCEEDED") == 600
    assert cluster_deleted_after(old_rules, "Complete", "STOPPED") is None
    assert cluster_deleted_after({}, "Complete", "STOPPED") is None  # no mechanism at all
    shutdown = {"shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": 600}
    assert {cluster_deleted_after(shutdown, *end) for end in RAYJOB_ENDS} == {600}
