"""S3 as a Ray cluster's users run the job on it: `prepare-data --out s3://...` writes the shards,
`train --data s3://... --storage-path s3://...` reads them and keeps its checkpoints (and its
storage probe) there. Against a real S3 API server on 127.0.0.1: moto's server mode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pyarrow import fs

from tests.conftest import SMALL, free_port, metrics_of, run_cli, train_args, wait_for

pytestmark = pytest.mark.slow
BUCKET = "fashion"


@pytest.fixture(scope="module")
def s3_env():
    """The environment of a process using the server: endpoint, credentials, region."""
    port = free_port()
    server = subprocess.Popen([Path(sys.executable).with_name("moto_server"), "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    s3 = fs.S3FileSystem(endpoint_override=endpoint, access_key="testing", secret_key="testing",
                         region="us-east-1", allow_bucket_creation=True)

    def bucket_made() -> bool:
        try:
            s3.create_dir(BUCKET)
            return True
        except OSError:  # the server is not listening yet
            return False

    try:
        wait_for(bucket_made, "the S3 server", timeout=60)
        yield env, s3
    finally:
        server.terminate()
        server.wait(30)


def test_the_dataset_and_the_checkpoints_on_s3(s3_env, source_dir, tmp_path):
    env, s3 = s3_env
    data = f"s3://{BUCKET}/fashion-mnist"
    r = run_cli("prepare-data", "--source", source_dir, "--out", data, "--shards", "4",
                "--limit", str(SMALL), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    shards = s3.get_file_info(fs.FileSelector(f"{BUCKET}/fashion-mnist/train"))
    assert len(shards) == 4 and all(s.size > 0 for s in shards)

    r = run_cli(*train_args(data, tmp_path, "--epochs", "1", "--num-workers", "2", "--name", "s3run",
                            storage=f"s3://{BUCKET}/checkpoints"), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = metrics_of(tmp_path)
    assert metrics["epochs_completed"] == 1 and metrics["test_accuracy"] > 0.1
    stored = [i.path for i in s3.get_file_info(fs.FileSelector(f"{BUCKET}/checkpoints/s3run",
                                                               recursive=True))]
    assert any(p.endswith("/ckpt.index") for p in stored), stored
    assert metrics["checkpoint"].startswith(f"{BUCKET}/checkpoints/s3run/checkpoint_"), metrics
    assert not (tmp_path / "ckpt").exists()  # nothing of the run's storage on local disk
