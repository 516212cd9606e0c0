import numpy as np

from job.model import MODELS, build_model


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
