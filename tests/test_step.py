"""The gradients' all-reduce as the step's graph runs it, on two real MWMS workers (no Ray):
which type crosses the network, in how many packs, in which order, and what a step then does."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, free_port

pytestmark = pytest.mark.slow  # two TensorFlow processes

SEED_PARAMETERS = 841_546
DENSE_LAYERS = 802_944 + 1_290  # the flatten->Dense and the output layer: ~95 % of the bytes


def two_worker_step(tmp_path, *settings: str) -> list[list[dict]]:
    """Each worker's report for each COMPRESSION:PACK_MB setting, in order."""
    ports = f"{free_port()},{free_port()}"
    logs = [(tmp_path / f"out{rank}", tmp_path / f"err{rank}") for rank in (0, 1)]
    workers = []
    for rank, (out, err) in enumerate(logs):  # files, not pipes: one full pipe would stall both
        with open(out, "w") as o, open(err, "w") as e:
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "tests.two_worker_step", str(rank), ports, *settings],
                cwd=REPO, stdout=o, stderr=e))
    try:
        for w, (_, err) in zip(workers, logs, strict=True):
            assert w.wait(timeout=300) == 0, err.read_text()[-3000:]
    finally:
        for w in workers:
            w.kill()
            w.wait()
    return [[json.loads(line) for line in out.read_text().splitlines()] for out, _ in logs]


def test_gradients_cross_as_one_float32_pack_or_as_16_bit_packs_the_dense_layers_first(tmp_path):
    rank0, rank1 = two_worker_step(tmp_path, "none:0", "fp16:1", "bf16:0")
    plain, fp16, bf16 = rank0
    assert plain["packs"] == [["float32", SEED_PARAMETERS]]  # after the whole backward pass
    # Half the bytes, and the Dense layers' gradients (the first backprop makes) go on their own.
    assert fp16["packs"] == [["float16", DENSE_LAYERS], ["float16", SEED_PARAMETERS - DENSE_LAYERS]]
    assert bf16["packs"] == [["bfloat16", SEED_PARAMETERS]]
    for mine, theirs in zip(rank0, rank1, strict=True):  # every worker applies the same sum
        assert mine["weights"] == theirs["weights"], mine["setting"]
    # The same step but for rounding. Adam's first step moves each weight by about the learning
    # rate (1e-3) whatever the gradient's size; where a gradient is so small that 16 bits round it
    # off (float16 below ~6e-5; bfloat16 keeps 8 bits), its weight moves differently, by less
    # than that rate: a tenth of it, for fewer than 1 in 1,000 weights.
    weights = [np.concatenate(r["weights"]) for r in (plain, fp16, bf16)]
    for compressed in weights[1:]:
        off = np.abs(compressed - weights[0])
        assert off.max() < 1e-3 and np.mean(off > 1e-4) < 1e-3, (off.max(), np.mean(off > 1e-4))
        assert off.max() > 0  # and it did round
