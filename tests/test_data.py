import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from job import data as D
from job.config import JobError
from tests.conftest import REPO, SMALL, can_unshare_mounts, error_line, run_cli


def test_parquet_round_trip_keeps_the_official_pixels_and_labels(source_dir, small_data):
    official = D.load_official(source_dir)
    images, labels = D.read_split(small_data, "test")
    np.testing.assert_array_equal(images[..., 0], official["test"][0][:SMALL])
    np.testing.assert_array_equal(labels, official["test"][1][:SMALL])
    assert images.shape == (SMALL, 28, 28, 1) and images.dtype == np.uint8


def test_train_and_val_are_a_seeded_disjoint_split_of_the_train_images(source_dir, small_data):
    official_images = D.load_official(source_dir)["train"][0][:SMALL].reshape(SMALL, -1)
    train, _ = D.read_split(small_data, "train")
    val, _ = D.read_split(small_data, "val")
    assert (len(train), len(val)) == (960, 240)  # 80/20, as the reference's 48k/12k
    rows = {row.tobytes() for row in official_images}
    seen = [img.tobytes() for img in np.concatenate([train, val]).reshape(SMALL, -1)]
    assert set(seen) == rows and len(seen) == len(rows)
    # The dataset's validation images are the seed-0 split's, and another seed splits otherwise.
    (_, _), (seed0, _) = D.split_train_val(official_images, np.arange(SMALL), 0.2, seed=0)
    (_, _), (seed1, _) = D.split_train_val(official_images, np.arange(SMALL), 0.2, seed=1)
    val_rows = {row.tobytes() for row in val.reshape(len(val), -1)}
    assert val_rows == {row.tobytes() for row in seed0}
    assert val_rows != {row.tobytes() for row in seed1}


def test_schema_is_raw_bytes_and_uint8_labels(small_data):
    schema = pq.read_schema(os.path.join(small_data, "train", "part-00000.parquet"))
    assert schema.field("image").type == pa.binary(784)
    assert schema.field("label").type == pa.uint8()


def test_each_worker_gets_its_own_shards_and_together_all_of_them(small_data):
    manifest = D.load_manifest(small_data)
    per_rank = [D.shard_files(manifest, "train", r, 2) for r in range(2)]
    assert per_rank == [["part-00000.parquet", "part-00002.parquet"],
                        ["part-00001.parquet", "part-00003.parquet"]]
    assert [list(D.read_partitions(small_data, "train", manifest, r, 2)) for r in range(2)] == [
        [0, 2], [1, 3]]
    parts = [D.read_split(small_data, "train", manifest, r, 2)[1] for r in range(2)]
    assert sum(map(len, parts)) == 960
    whole = D.read_split(small_data, "train", manifest)[1]
    assert sorted(np.concatenate(parts)) == sorted(whole)
    with pytest.raises(JobError, match="fewer than 5 workers"):
        D.shard_files(manifest, "train", 0, 5)


@pytest.mark.parametrize("batch,sizes,message", [
    (66, [2], "--batch-size 66 .global. must be a multiple of the 4 train shards"),
    (64, [3], "3 worker.s. cannot share the 4 train shards of .*: use worker counts that divide 4"),
    (64, [1, 2, 3], "3 worker.s. cannot share"),
])
def test_workers_and_batch_must_fit_the_fixed_partitions(small_data, batch, sizes, message):
    manifest = D.load_manifest(small_data)
    D.check_partitions(small_data, manifest, 64, [1, 2, 4])
    with pytest.raises(JobError, match=message):
        D.check_partitions(small_data, manifest, batch, sizes)


def test_prepare_data_is_idempotent_and_never_overwrites_another_dataset(source_dir, small_data):
    def files():
        return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in Path(small_data).rglob("*")
                if p.is_file()}

    before = files()
    manifest = D.prepare_data(source_dir, small_data, num_shards=4, seed=0, limit=SMALL)
    assert manifest == D.load_manifest(small_data)
    assert files() == before  # not one file rewritten
    with pytest.raises(JobError, match="already holds a dataset made with"):
        D.prepare_data(source_dir, small_data, num_shards=4, seed=1, limit=SMALL)


def test_prepare_data_refuses_a_foreign_non_empty_directory(source_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    r = run_cli("prepare-data", "--source", source_dir, "--out", str(tmp_path), "--limit", "100")
    assert r.returncode == 2
    assert "is not empty and holds no dataset" in error_line(r)
    assert os.listdir(tmp_path) == ["notes.txt"]


@pytest.mark.skipif(not can_unshare_mounts(), reason="needs a private mount namespace for a read-only mount")
def test_prepare_data_on_a_read_only_volume_is_one_clear_error(source_dir, tmp_path):
    """As on an RWX volume this user may not write (docs/kubernetes.md: RWX ownership)."""
    volume = tmp_path / "volume"
    volume.mkdir()
    read_only = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    r = subprocess.run(["unshare", "--mount", "sh", "-c", read_only, str(volume), sys.executable,
                        "-m", "job", "prepare-data", "--source", source_dir, "--out",
                        str(volume / "fashion-mnist")], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert error_line(r).startswith(f"error: cannot write the dataset to {volume / 'fashion-mnist'}: ")
    assert "Read-only file system" in error_line(r) and "running as UID" in error_line(r)
    assert os.listdir(volume) == []


def test_prepare_data_through_a_uri(source_dir, tmp_path):
    r = run_cli("prepare-data", "--source", f"file://{source_dir}", "--out",
                f"file://{tmp_path}/ds", "--limit", "100", "--shards", "2")
    assert r.returncode == 0, r.stderr
    assert "{'train': 80, 'val': 20, 'test': 100}" in r.stdout
    assert len(D.read_split(f"file://{tmp_path}/ds", "val")[1]) == 20


def test_missing_source_dir_is_one_clear_error(tmp_path):
    r = run_cli("prepare-data", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert error_line(r) == f"error: source directory not found: {tmp_path / 'nope'}"
    assert not (tmp_path / "o").exists()


def test_data_that_is_not_fashion_mnist_is_refused(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 100)
    with pytest.raises(JobError, match="not the official Fashion-MNIST file"):
        D.load_official(str(tmp_path))


# ---- bad datasets: each gives one line through `train`, before any Ray worker starts


def _rewrite(path, table):
    pq.write_table(table, path)


def _damage(kind: str, data: str) -> str:
    shard = os.path.join(data, "train", "part-00001.parquet")
    table = pq.read_table(shard)
    if kind == "corrupt":
        with open(shard, "r+b") as f:
            f.seek(100)
            f.write(b"\xff" * 2000)
    elif kind == "truncated-file":
        with open(shard, "r+b") as f:
            f.truncate(os.path.getsize(shard) // 2)
    elif kind == "fewer-rows":
        _rewrite(shard, table.slice(0, 10))
    elif kind == "wrong-columns":
        _rewrite(shard, table.rename_columns(["pixels", "label"]))
    elif kind == "bad-labels":
        labels = pa.array(np.full(table.num_rows, 12, dtype=np.uint8))
        _rewrite(shard, table.set_column(1, "label", labels))
    elif kind == "missing-manifest":
        os.remove(os.path.join(data, D.MANIFEST))
    return shard


@pytest.mark.parametrize("kind,message", [
    ("corrupt", "corrupt shard {shard}"),
    ("truncated-file", "corrupt shard {shard}"),
    ("fewer-rows", "truncated shard {shard}: 10 rows, manifest says 240"),
    ("wrong-columns", "wrong columns in {shard}: got (pixels: fixed_size_binary[784], label: uint8)"),
    ("bad-labels", "labels outside 0-9 in {shard}"),
    ("missing-manifest", "dataset incomplete: no _manifest.json in {data}"),
])
def test_bad_dataset_fails_train_with_one_line_and_writes_nothing(kind, message, data_copy, tmp_path):
    shard = _damage(kind, data_copy)
    out = tmp_path / "out"
    r = run_cli("train", "--data", data_copy, "--output", str(out), "--storage-path",
                str(tmp_path / "ckpt"), timeout=120)
    assert r.returncode == 2
    assert error_line(r).startswith("error: " + message.format(shard=shard, data=data_copy))
    assert not out.exists() and not (tmp_path / "ckpt").exists()


def test_missing_data_dir_fails_train(tmp_path):
    r = run_cli("train", "--data", str(tmp_path / "none"), "--output", str(tmp_path / "o"))
    assert r.returncode == 2
    assert error_line(r) == f"error: dataset missing: no _manifest.json in {tmp_path / 'none'} " \
                            "(run `python -m job prepare-data`)"


def test_manifest_records_rows_per_part_file(small_data):
    with open(os.path.join(small_data, D.MANIFEST)) as f:
        manifest = json.load(f)
    assert {s: sum(files.values()) for s, files in manifest["splits"].items()} == {
        "train": 960, "val": 240, "test": SMALL}
