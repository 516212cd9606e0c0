import subprocess
import sys

import numpy as np
import pytest

from job.model import MODELS, build_model, scored_model


def test_seed_model_matches_the_reference_parameter_count():
    assert build_model("seed", 1e-3).count_params() == 841_546


def test_seed_model_layers_follow_the_reference():
    model = MODELS["seed"]()
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["Conv2D", "LeakyReLU", "MaxPooling2D", "Conv2D", "LeakyReLU", "MaxPooling2D",
                     "Flatten", "Dense", "Dense"]
    assert model.layers[3].activation.__name__ == "softmax"  # kept from the reference
    assert model.layers[-1].activation.__name__ == "softmax"


def test_every_model_maps_images_to_class_probabilities():
    images = np.random.default_rng(0).random((3, 28, 28, 1), dtype=np.float32)
    for name in MODELS:
        probs = build_model(name, 1e-3, steps_per_epoch=10, epochs=2).predict(images, verbose=0)
        assert probs.shape == (3, 10)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.slow  # a TensorFlow process (~7 s): outside `make test-fast`
def test_mixed_precision_keeps_float32_variables_and_outputs():
    code = ("import tf_keras as k; k.mixed_precision.set_global_policy('mixed_float16'); "
            "from job.model import build_model; m = build_model('seed', 1e-3); "
            "print(m.layers[0].compute_dtype, m.layers[0].variables[0].dtype.name, m.output.dtype.name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "float16 float32 float32"


def test_adam_beta2_reaches_the_optimizer():
    assert build_model("seed", 1e-3, adam_beta2=0.99).optimizer.beta_2 == 0.99


def test_the_mirror_averaged_model_scores_an_image_as_its_mirror_and_reloads_the_same(tmp_path):
    import tf_keras as keras

    images = np.random.default_rng(0).random((4, 28, 28, 1), dtype=np.float32)
    model = build_model("seed", 1e-3)
    scored = scored_model(model, flips=True)
    assert scored_model(model, flips=False) is model and scored.count_params() == model.count_params()
    probs = scored.predict(images, verbose=0)
    expected = (model.predict(images, verbose=0) + model.predict(images[:, :, ::-1], verbose=0)) / 2
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(scored.predict(images[:, :, ::-1], verbose=0), probs, rtol=1e-5, atol=1e-7)
    scored.save(tmp_path / "model")  # the export: a SavedModel that tf-keras reloads
    reloaded = keras.models.load_model(tmp_path / "model")
    np.testing.assert_allclose(reloaded.predict(images, verbose=0), probs, rtol=1e-5, atol=1e-7)


def test_forward_flops_count_each_convolution_and_dense_layer():
    from job.model import forward_flops

    # The seed CNN by hand: 28x28x32 outputs of 3x3x1, 14x14x128 of 3x3x32, 6272x128, 128x10.
    by_hand = 2 * (28 * 28 * 32 * 9 + 14 * 14 * 128 * 9 * 32 + 6272 * 128 + 128 * 10)
    assert forward_flops(build_model("seed", 1e-3)) == by_hand
    assert forward_flops(build_model("strong", 1e-3)) > by_hand
