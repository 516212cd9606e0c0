"""KubeRay v1.7.0's K8sJobMode submitter, rebuilt from the operator's source, so that tests run
our RayJobs the way the operator does (against a local Ray cluster).

Read at tag v1.7.0 of ray-project/kuberay, ray-operator/controllers/ray/:
- common/job.go, BuildJobSubmitCommand: ONE shell line: wait for the dashboard's GCS health,
  `if ! ray job status ID; then ray job submit --no-wait ... -- ENTRYPOINT ; fi ;
  ray job logs --follow ID`, the entrypoint pasted in raw;
- rayjob_controller.go: configureSubmitterContainer (`/bin/bash -ce --` from
  utils.GetContainerCommand; env PYTHONUNBUFFERED, RAY_DASHBOARD_ADDRESS, RAY_JOB_SUBMISSION_ID,
  token auth from common.SetContainerTokenAuthEnvVars), createNewK8sJob (the submitter is a
  Kubernetes Job, backoffLimit 2 unless submitterConfig says otherwise: 3 pods at most);
- rayjob_controller.go, Reconcile's Complete/Failed case and handleDeletionRules /
  handleShutdownAfterJobFinishes: what deletes a finished RayJob's cluster (cluster_deleted_after);
- utils/util.go GenerateRayJobId (`<RayJob name>-<5 random chars>`), utils/constant.go (the
  health command, `api/gcs_healthz`, its 10 s timeout).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.conftest import RAY

HEALTH_COMMAND = ("python -c \"import urllib.request; r=urllib.request.urlopen('%s', timeout=%d); "
                  "exit(0 if b'success' in r.read() else 1)\"")
HEALTH_PATH, HEALTH_TIMEOUT_S = "api/gcs_healthz", 10
SUBMITTER_BACKOFF_LIMIT = 2
RAND_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # k8s.io/apimachinery/pkg/util/rand.String


def random_suffix() -> str:
    return "".join(random.choices(RAND_ALPHABET, k=5))


def go_quote(text: str) -> str:
    """Go's strconv.Quote for the printable text KubeRay quotes (JSON strings escape alike)."""
    return json.dumps(text, ensure_ascii=False)


def go_json(value) -> str:
    """encoding/json of a map: compact, keys sorted, <>& escaped (as yaml.YAMLToJSON gives it)."""
    text = json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def job_submit_command(spec: dict, dashboard_url: str, job_id: str) -> str:
    """BuildJobSubmitCommand(rayJob, K8sJobMode), joined with spaces as the controller does."""
    address = dashboard_url if dashboard_url.startswith("http://") else "http://" + dashboard_url
    health = HEALTH_COMMAND % (f"{address}/{HEALTH_PATH}", HEALTH_TIMEOUT_S)
    cmd = ["until", health, ">/dev/null", "2>&1", ";",
           "do", "echo", go_quote(f"Waiting for Ray Dashboard GCS to become healthy at {address} ..."),
           ";", "sleep", "2", ";", "done", ";"]
    cmd += ["if", "!", "ray", "job", "status", "--address", address, job_id, ">/dev/null", "2>&1",
            ";", "then", "ray", "job", "submit", "--address", address, "--no-wait"]
    if spec.get("runtimeEnvYAML"):
        cmd += ["--runtime-env-json", go_quote(go_json(yaml.safe_load(spec["runtimeEnvYAML"])))]
    if spec.get("metadata"):
        cmd += ["--metadata-json", go_quote(go_json(spec["metadata"]))]
    cmd += ["--submission-id", job_id]
    for field, flag in (("entrypointNumCpus", "--entrypoint-num-cpus"),
                        ("entrypointNumGpus", "--entrypoint-num-gpus")):
        if spec.get(field, 0) > 0:
            cmd += [flag, f"{spec[field]:f}"]
    if spec.get("entrypointResources"):
        cmd += ["--entrypoint-resources", go_quote(spec["entrypointResources"])]
    cmd += ["--", spec["entrypoint"].strip(), ";", "fi", ";",
            "ray", "job", "logs", "--address", address, "--follow", job_id]
    return " ".join(cmd)


def run_submitter_job(spec: dict, cluster: dict, job_id: str, hide: Path | None = None,
                      timeout: float = 900) -> list[subprocess.CompletedProcess]:
    """The submitter Kubernetes Job: pods of `/bin/bash -ce -- COMMAND`, a new one after each
    failure (backoff 10 s, 20 s, ...) until one succeeds or the backoff limit is spent.

    Each pod sees none of the RayJob's volumes: `hide` (the directory the tests map those volumes
    into) is covered with an empty tmpfs in a private mount namespace, as a pod would not have
    them. The image gives the pod `ray` and `python` (here: this venv's)."""
    dashboard_url = cluster["address"].removeprefix("http://")
    command = ["/bin/bash", "-ce", "--", job_submit_command(spec, dashboard_url, job_id)]
    if hide is not None:
        command = ["unshare", "--mount", "sh", "-c", 'mount -t tmpfs pod "$0" && exec "$@"',
                   str(hide), *command]
    env = {"PATH": f"{Path(RAY).parent}:/usr/bin:/bin", "HOME": "/nonexistent",
           "PYTHONUNBUFFERED": "1", "RAY_DASHBOARD_ADDRESS": dashboard_url,
           "RAY_JOB_SUBMISSION_ID": job_id, "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": Path(cluster["token"]).read_text().strip()}
    limit = (spec.get("submitterConfig") or {}).get("backoffLimit", SUBMITTER_BACKOFF_LIMIT)
    pods = []
    for attempt in range(limit + 1):
        pods.append(subprocess.run(command, cwd="/", env=env, capture_output=True, text=True,
                                   timeout=timeout))
        if pods[-1].returncode == 0:
            break
        time.sleep(10 * 2**attempt)
    return pods


def ray_job_status(cluster: dict, job_id: str) -> str | None:
    """The Ray job's status, read like the operator's dashboard client (None: no such job)."""
    probe = ("import sys; from ray.job_submission import JobSubmissionClient\n"
             "jobs = JobSubmissionClient(sys.argv[1]).list_jobs()\n"
             "print(next((j.status.value for j in jobs if j.submission_id == sys.argv[2]), ''))")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": cluster["token"]}
    result = subprocess.run([sys.executable, "-c", probe, cluster["address"], job_id], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip() or None


# The end states of a RayJob: (jobDeploymentStatus, the Ray job's status). A stopped Ray job
# (`ray job stop`) ends Complete like a succeeded or failed one; Failed comes from deadlines and a
# submitter that gave up, whatever the Ray job did.
RAYJOB_ENDS = [("Complete", "SUCCEEDED"), ("Complete", "FAILED"), ("Complete", "STOPPED"),
               ("Failed", "RUNNING"), ("Failed", "PENDING"), ("Failed", "")]


def cluster_deleted_after(spec: dict, deployment_status: str, job_status: str) -> int | None:
    """Seconds after the end at which the operator deletes the RayJob's cluster (None: never), as
    rayjob_controller.go's terminal-state case decides it (deletion-policy gate on)."""
    assert deployment_status in ("Complete", "Failed")
    if spec.get("clusterSelector"):
        return None  # an existing cluster is never deleted
    if "deletionStrategy" in spec:
        rules = spec["deletionStrategy"].get("deletionRules")
        assert rules is not None, "the legacy onSuccess/onFailure policies are not modelled"
        # isDeletionRuleMatched: jobStatus and jobDeploymentStatus, whichever the rule sets
        ttls = [r["condition"]["ttlSeconds"] for r in rules
                if r["policy"] in ("DeleteCluster", "DeleteSelf")
                and r["condition"].get("jobStatus", job_status) == job_status
                and r["condition"].get("jobDeploymentStatus", deployment_status) == deployment_status]
        return min(ttls, default=None)
    if spec.get("shutdownAfterJobFinishes"):
        return spec.get("ttlSecondsAfterFinished", 0)
    return None
