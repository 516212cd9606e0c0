"""Fashion-MNIST: official IDX files -> sharded Parquet -> numpy arrays for one worker.

Layout written by `prepare-data` (local path or any pyarrow.fs URI: s3://, gs://, file://):

    DATA/train/part-00000.parquet ...   48,000 rows (seeded split of the official 60k)
    DATA/val/part-00000.parquet ...     12,000 rows
    DATA/test/part-00000.parquet ...    10,000 rows (the official test set)
    DATA/_manifest.json                 rows per part file; written last, so its presence
                                        means the dataset is complete

Each row is `image: fixed_size_binary(784)` (raw uint8 pixels, row-major 28x28) and `label: uint8`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from job.config import JobError

SPLITS = ("train", "val", "test")
IMAGE_SIDE = 28
IMAGE_BYTES = IMAGE_SIDE * IMAGE_SIDE
NUM_CLASSES = 10
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
SCHEMA = pa.schema([("image", pa.binary(IMAGE_BYTES)), ("label", pa.uint8())])
MANIFEST = "_manifest.json"
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"  # where `apt install dataset-fashion-mnist` puts it

# sha256 of the *decompressed* official files, so any gzip of the real data is accepted.
OFFICIAL_FILES = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}


def default_source() -> str:
    return os.environ.get("FASHION_MNIST_DIR") or DEBIAN_DIR


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A local path (relative is fine) or a pyarrow.fs URI -> (filesystem, path)."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError, OSError) as e:
        raise JobError(f"cannot open {uri}: {e}") from None


# ---------------------------------------------------------------- official IDX files -> arrays


def read_idx(fs: pafs.FileSystem, directory: str, stem: str) -> np.ndarray:
    """Read `stem` or `stem.gz` from `directory`, checking it is the official file."""
    for name in (stem + ".gz", stem):
        path = f"{directory}/{name}"
        if fs.get_file_info(path).type == pafs.FileType.File:
            break
    else:
        raise JobError(f"missing {stem}[.gz] in {directory} (set --source or $FASHION_MNIST_DIR)")
    with fs.open_input_stream(path, compression=None) as f:  # we gunzip, and check the result
        raw = f.read()
    try:
        raw = gzip.decompress(raw) if name.endswith(".gz") else raw
    except (OSError, EOFError) as e:
        raise JobError(f"corrupt gzip file {path}: {e}") from None
    if hashlib.sha256(raw).hexdigest() != OFFICIAL_FILES[stem]:
        raise JobError(f"{path} is not the official Fashion-MNIST file (sha256 mismatch)")
    ndim = raw[3]
    shape = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_official(source: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    fs, directory = resolve(source)
    if fs.get_file_info(directory).type != pafs.FileType.Directory:
        raise JobError(f"source directory not found: {source}")
    return {
        split: (read_idx(fs, directory, f"{prefix}-images-idx3-ubyte"),
                read_idx(fs, directory, f"{prefix}-labels-idx1-ubyte"))
        for split, prefix in (("train", "train"), ("test", "t10k"))
    }


# ---------------------------------------------------------------- arrays -> sharded Parquet


def split_train_val(images, labels, val_fraction: float, seed: int):
    """Deterministic, seeded split (the reference's 48k/12k of the 60k)."""
    order = np.random.default_rng(seed).permutation(len(labels))
    n_val = round(len(labels) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    return (images[train], labels[train]), (images[val], labels[val])


def to_table(images: np.ndarray, labels: np.ndarray) -> pa.Table:
    flat = np.ascontiguousarray(images, dtype=np.uint8).reshape(-1)
    image_col = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(IMAGE_BYTES), len(labels), [None, pa.py_buffer(flat)]
    )
    return pa.Table.from_arrays([image_col, pa.array(labels, pa.uint8())], schema=SCHEMA)


def prepare_data(source: str, out: str, num_shards: int = 8, seed: int = 0,
                 val_fraction: float = 0.2, limit: int = 0) -> dict:
    """Write the sharded dataset; a no-op if `out` already holds the same one."""
    if num_shards < 1:
        raise JobError(f"--shards must be >= 1 (got {num_shards})")
    recipe = {"seed": seed, "val_fraction": val_fraction, "limit": limit, "shards": num_shards}
    fs, root = resolve(out)
    existing = _read_manifest(fs, root, required=False)
    if existing is not None:
        if existing["recipe"] != recipe:
            raise JobError(f"{out} already holds a dataset made with {existing['recipe']}; "
                           f"remove it or choose another --out")
        return existing
    _check_only_leftovers(fs, root, out)
    arrays = load_official(source)
    try:
        return _write_dataset(fs, root, out, arrays, recipe)
    except OSError as e:  # e.g. a read-only volume, or one this user may not write
        raise JobError(f"cannot write the dataset to {out}: {e} (running as UID {os.getuid()})") from None


def has_dataset(data: str) -> bool:
    """Whether `data` holds a complete dataset (its manifest is written last)."""
    return _read_manifest(*resolve(data), required=False) is not None


def ensure_dataset(source: str, out: str) -> None:
    """Leave `out` as it is if it holds a dataset (any recipe), else write the default one."""
    if not has_dataset(out):
        prepare_data(source, out)


def _write_dataset(fs, root: str, out: str, arrays: dict, recipe: dict) -> dict:
    limit, seed, val_fraction, num_shards = (recipe[k] for k in ("limit", "seed", "val_fraction", "shards"))
    if limit:  # small real subsets for smoke tests
        arrays = {k: (x[:limit], y[:limit]) for k, (x, y) in arrays.items()}
    train, val = split_train_val(*arrays["train"], val_fraction, seed)
    manifest = {"format": 1, "recipe": recipe, "splits": {}}
    for split, (images, labels) in (("train", train), ("val", val), ("test", arrays["test"])):
        fs.create_dir(f"{root}/{split}", recursive=True)
        files = {}
        for i, idx in enumerate(np.array_split(np.arange(len(labels)), num_shards)):
            name = f"part-{i:05d}.parquet"
            pq.write_table(to_table(images[idx], labels[idx]), f"{root}/{split}/{name}",
                           filesystem=fs)
            files[name] = len(idx)
        manifest["splits"][split] = files
    # Verify what is on storage before declaring the dataset complete.
    for split in SPLITS:
        read_split(out, split, manifest)
    with fs.open_output_stream(f"{root}/{MANIFEST}") as f:
        f.write(json.dumps(manifest, indent=1).encode())
    return manifest


def _check_only_leftovers(fs, root, out):
    """Refuse to write into a non-empty directory unless it is an interrupted prepare-data."""
    info = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    foreign = [i.base_name for i in info if i.base_name not in SPLITS]
    if foreign:
        raise JobError(f"{out} is not empty and holds no dataset ({foreign[0]} ...); "
                       f"choose an empty --out")
    for i in info:
        fs.delete_dir(i.path)


# ---------------------------------------------------------------- Parquet -> arrays (checked)


def _read_manifest(fs, root: str, required: bool = True) -> dict | None:
    path = f"{root}/{MANIFEST}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        if not required:
            return None
        kind = "incomplete" if fs.get_file_info(root).type == pafs.FileType.Directory else "missing"
        raise JobError(f"dataset {kind}: no {MANIFEST} in {root} (run `python -m job prepare-data`)")
    with fs.open_input_stream(path) as f:
        try:
            return json.loads(f.read())
        except ValueError:
            raise JobError(f"corrupt manifest {path}") from None


def load_manifest(data: str) -> dict:
    fs, root = resolve(data)
    return _read_manifest(fs, root)


def shard_files(manifest: dict, split: str, rank: int = 0, world: int = 1) -> list[str]:
    """Part files of `split` that belong to worker `rank` of `world` (round robin)."""
    names = sorted(manifest["splits"][split])
    if len(names) < world:
        raise JobError(f"{split} has {len(names)} shards, fewer than {world} workers; "
                       f"rerun prepare-data with --shards >= {world}")
    return names[rank::world]


def check_partitions(data: str, manifest: dict, batch_size: int, world_sizes) -> None:
    """The shards of train and val are fixed partitions that every global step draws from
    equally, split evenly across the workers (train.partitioned_dataset): check both fit."""
    for split in ("train", "val"):
        partitions = len(manifest["splits"][split])
        if batch_size % partitions:
            raise JobError(f"--batch-size {batch_size} (global) must be a multiple of the {partitions} "
                           f"{split} shards of {data}: every step takes as many images from each")
        micro, fewest = batch_size // partitions, min(manifest["splits"][split].values())
        if fewest < micro:  # an epoch of 0 steps: tf-keras would fail in every worker
            raise JobError(f"--batch-size {batch_size} takes {micro} images a step from each {split} "
                           f"shard of {data}, whose smallest holds {fewest}: not one step; use "
                           f"--batch-size <= {fewest * partitions}")
        for world in world_sizes:
            if partitions % world:
                raise JobError(f"{world} worker(s) cannot share the {partitions} {split} shards of "
                               f"{data} evenly: use worker counts that divide {partitions}, or "
                               f"rerun prepare-data with --shards a multiple of {world}")


def read_partitions(data: str, split: str, manifest: dict | None = None, rank: int = 0,
                    world: int = 1) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{partition: (images (N, 28, 28, 1) uint8, labels (N,) uint8)} for each shard of `split`
    that worker `rank` of `world` owns (shard_files), in shard order; a partition is the shard's
    place among the split's shards. Every shard fully checked."""
    fs, root = resolve(data)
    manifest = manifest or _read_manifest(fs, root)
    names = sorted(manifest["splits"][split])
    return {names.index(name): _arrays(_read_shard(fs, f"{root}/{split}/{name}",
                                                   manifest["splits"][split][name]))
            for name in shard_files(manifest, split, rank, world)}


def read_split(data: str, split: str, manifest: dict | None = None, rank: int = 0,
               world: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of this rank's shards of `split`, concatenated (see read_partitions)."""
    parts = read_partitions(data, split, manifest, rank, world).values()
    images, labels = zip(*parts, strict=True)
    return np.concatenate(images), np.concatenate(labels)


def _arrays(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    images = table.column("image").combine_chunks()
    pixels = np.frombuffer(images.buffers()[1] or b"", dtype=np.uint8,
                           count=len(images) * IMAGE_BYTES, offset=images.offset * IMAGE_BYTES)
    labels = table.column("label").to_numpy()
    return pixels.reshape(-1, IMAGE_SIDE, IMAGE_SIDE, 1), labels


def _read_shard(fs, path: str, expected_rows: int) -> pa.Table:
    try:
        table = pq.read_table(path, filesystem=fs)
    except FileNotFoundError:
        raise JobError(f"missing shard {path}") from None
    except (pa.ArrowException, OSError) as e:
        raise JobError(f"corrupt shard {path}: {str(e).splitlines()[0]}") from None
    if not table.schema.equals(SCHEMA):
        got = ", ".join(f"{f.name}: {f.type}" for f in table.schema)
        raise JobError(f"wrong columns in {path}: got ({got}), want (image: binary(784), label: uint8)")
    if table.num_rows != expected_rows:
        raise JobError(f"truncated shard {path}: {table.num_rows} rows, manifest says {expected_rows}")
    if table.num_rows and pc.max(table.column("label")).as_py() >= NUM_CLASSES:
        raise JobError(f"labels outside 0-{NUM_CLASSES - 1} in {path}")
    return table


def validate_dataset(data: str) -> dict:
    """Read every shard once (cheap: ~55 MB) so bad data fails before any worker starts."""
    manifest = load_manifest(data)
    for split in SPLITS:
        read_split(data, split, manifest)
    return manifest
