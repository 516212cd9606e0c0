"""`make seeds`: a recipe over seeds through the job's CLI, and the table it prints."""

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_a_recipe_over_two_seeds_gives_per_seed_rows_and_the_spread(small_data, tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench.seeds", "--recipe", "reference", "--seeds", "0",
                        "1", "--data", small_data, "--out", str(tmp_path), "--", "--epochs", "1",
                        "--num-workers", "1"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    table = (tmp_path / "reference.md").read_text()
    rows = re.findall(r"^\| ([01]) \| (0\.\d{4}) \| [\d.]+ \| 1 \| 15 \| \d+ \|$", table, re.M)
    assert [seed for seed, _ in rows] == ["0", "1"]
    assert rows[0][1] != rows[1][1]  # another seed, another model
    accuracies = [float(a) for _, a in rows]
    mean = sum(accuracies) / 2
    assert table.startswith(f"`--recipe reference`: test accuracy {mean:.4f} ± ")
    assert f"min {min(accuracies):.4f}, over 2 seed(s)" in table
    assert "; training compute 0.05 TFLOPs an epoch (seed model: 16.5 MFLOPs an image forward, " \
           "x3, x960 images)" in table
    for seed in (0, 1):
        assert '"recipe": "reference"' in (tmp_path / f"reference-seed{seed}" / "metrics.json").read_text()
