"""The training input pipeline (train.partitioned_dataset) in-process, on the small real dataset."""

import numpy as np
import tensorflow as tf

from job import data as D
from job.config import JobConfig
from job.train import partitioned_dataset


def batches(small_data, split, epochs, **settings):
    cfg = JobConfig(data=small_data, **settings)
    dataset, steps = partitioned_dataset(tf.distribute.get_strategy(), cfg, D.load_manifest(small_data),
                                         split, epochs)
    return [(x.numpy(), y.numpy()) for x, y in dataset], steps


def stored_and_mirrored(small_data, split):
    """Each stored image's bytes, and its mirror's, mapped to its label."""
    images, labels = D.read_split(small_data, split)
    images = (images.reshape(-1, 28, 28, 1) / np.float32(255)).astype(np.float32)
    return ({im.tobytes(): lab for im, lab in zip(images, labels, strict=True)},
            {im[:, ::-1].tobytes(): lab for im, lab in zip(images, labels, strict=True)})


def test_flips_mirror_about_half_the_training_images_and_keep_their_labels(small_data):
    stored, mirrored = stored_and_mirrored(small_data, "train")
    flipped, steps = batches(small_data, "train", range(2), flips=True)
    plain, _ = batches(small_data, "train", range(2), flips=False)
    assert len(flipped) == len(plain) == 2 * steps
    counts = {"stored": 0, "mirrored": 0}
    for (x, y), (x_plain, y_plain) in zip(flipped, plain, strict=True):
        np.testing.assert_array_equal(y, y_plain)  # the same rows in the same order
        for image, onehot, image_plain in zip(x, y, x_plain, strict=True):
            key = image.tobytes()
            kind = "stored" if key in stored else "mirrored"
            assert (stored if kind == "stored" else mirrored)[key] == onehot.argmax()
            assert image_plain.tobytes() in stored
            counts[kind] += 1
    assert 0.4 < counts["mirrored"] / sum(counts.values()) < 0.6, counts


def test_validation_images_are_never_mirrored(small_data):
    stored, _ = stored_and_mirrored(small_data, "val")
    val, _ = batches(small_data, "val", None, flips=True)
    assert all(image.tobytes() in stored for x, _ in val for image in x)
