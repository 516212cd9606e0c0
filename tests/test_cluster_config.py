"""The Ray cluster-launcher config and runtime env, checked offline against what Ray ships."""

from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.conftest import pinned_ray_version

REPO = Path(__file__).resolve().parent.parent
CONFIG = yaml.safe_load((REPO / "cluster" / "gpu-cluster.yaml").read_text())


def test_gpu_cluster_config_validates_against_rays_schema():
    validate_config(prepare_config(CONFIG))  # raises on any unknown or mistyped field


def test_schema_check_catches_a_typo():
    with pytest.raises(Exception, match="head_node_typo"):
        validate_config(prepare_config({**CONFIG, "head_node_typo": "head"}))


def test_cluster_runs_the_pinned_ray_version_on_gpu_workers():
    pin = pinned_ray_version()
    assert CONFIG["docker"]["image"].startswith(f"rayproject/ray:{pin}-")
    assert CONFIG["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert "[gpu]" in " ".join(CONFIG["setup_commands"])
    assert all("RAY_AUTH_MODE=token" in c for c in
               CONFIG["head_start_ray_commands"][1:] + CONFIG["worker_start_ray_commands"][1:])


def test_runtime_env_leaves_heavy_dirs_behind():
    env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    assert {".venv/", "data/", "runs/"} <= set(env["excludes"])
