"""The job's environment has one source (job/env.py); the copies for processes the job does not
start itself must say the same."""

import re
import subprocess
import sys
from pathlib import Path

import yaml

from job.env import JOB_ENV
from tests.conftest import REPO


def test_ray_job_submit_runtime_env_sets_exactly_the_job_env():
    env = yaml.safe_load(Path(REPO, "cluster", "runtime_env.yaml").read_text())
    assert env["env_vars"] == JOB_ENV


def test_the_image_sets_the_job_env():
    dockerfile = Path(REPO, "k8s", "image", "Dockerfile").read_text()
    image_env = dict(re.findall(r"^\s*(?:ENV\s+)?([A-Z_]+)=(\S+?)\s*\\?$", dockerfile, re.M))
    assert {name: image_env.get(name) for name in JOB_ENV} == JOB_ENV


def test_the_cli_sets_the_job_env_before_tensorflow_loads():
    code = ("import os, sys; from job.cli import main; "
            f"print('tensorflow' in sys.modules, [os.environ.get(k) for k in {list(JOB_ENV)!r}])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"False {list(JOB_ENV.values())}"
