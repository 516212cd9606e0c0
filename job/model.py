"""The CNNs, by name. Build them inside `strategy.scope()` so their variables are mirrored.

We use tf-keras (Keras 2) explicitly: Keras 3 fails under MultiWorkerMirroredStrategy with more
than one worker.
"""

from __future__ import annotations

import tensorflow as tf
import tf_keras as keras
from tf_keras import layers

from job.data import IMAGE_SIDE, NUM_CLASSES

INPUT_SHAPE = (IMAGE_SIDE, IMAGE_SIDE, 1)


def seed_cnn(sequential=keras.Sequential, lib=keras) -> keras.Model:
    """The reference notebook's CNN, layer for layer: 841,546 parameters. `lib`: tf_keras, or
    Keras 3 for `make bench`'s baseline (the notebook's own Keras).

    The softmax activation on the second convolution is unusual but is part of the reference.
    """
    return sequential([
        lib.Input(INPUT_SHAPE),
        lib.layers.Conv2D(32, 3, padding="same", activation="linear"),
        lib.layers.LeakyReLU(0.1),  # alpha (tf-keras) or negative_slope (Keras 3)
        lib.layers.MaxPooling2D(2, padding="same"),
        lib.layers.Conv2D(128, 3, padding="same", activation="softmax"),
        lib.layers.LeakyReLU(0.1),
        lib.layers.MaxPooling2D(2, padding="same"),
        lib.layers.Flatten(),
        lib.layers.Dense(128, activation="linear"),
        lib.layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32"),
    ], name="seed")


# The strong CNN's two blocks: wider than 32/64, which underfit in 10 epochs (docs/recipes.md);
# 59 MFLOPs an image forward, 1.55x 32/64's (44/88, at 1.86x, scored no better). For the same
# reason light dropout: 0.25 after each block and 0.4 before the output fitted less and scored less.
STRONG_FILTERS = (40, 80)
STRONG_DROPOUT = {"block": 0.1, "dense": 0.3}


def strong_cnn(sequential=keras.Sequential) -> keras.Model:
    """A stronger option: batch norm, ReLU, dropout, horizontal flips; cosine LR (build_model)."""

    def conv_block(filters):
        return [
            layers.Conv2D(filters, 3, padding="same", use_bias=False),
            layers.BatchNormalization(),
            layers.ReLU(),
            layers.Conv2D(filters, 3, padding="same", use_bias=False),
            layers.BatchNormalization(),
            layers.ReLU(),
            layers.MaxPooling2D(2),
            layers.Dropout(STRONG_DROPOUT["block"]),
        ]

    return sequential([
        keras.Input(INPUT_SHAPE),
        layers.RandomFlip("horizontal"),  # clothes are left-right symmetric; active in training only
        *(layer for filters in STRONG_FILTERS for layer in conv_block(filters)),
        layers.Flatten(),
        layers.Dense(256, use_bias=False),
        layers.BatchNormalization(),
        layers.ReLU(),
        layers.Dropout(STRONG_DROPOUT["dense"]),
        layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32"),
    ], name="strong")


MODELS = {"seed": seed_cnn, "strong": strong_cnn}


def forward_flops(model: keras.Model) -> int:
    """Floating-point operations of one image's forward pass through the convolutions and dense
    layers (2 per multiply-add); pooling, batch norm and activations add about 1 % more. A
    training step costs about 3 times this per image (the backward pass: 2)."""
    flops = 0
    for layer in model.layers:
        if isinstance(layer, layers.Conv2D):
            height, width, _ = layer.output.shape[1:]
            flops += 2 * height * width * int(tf.size(layer.kernel))
        elif isinstance(layer, layers.Dense):
            flops += 2 * int(tf.size(layer.kernel))
    return flops


def mirror_averaged(model, images):
    """The mean of the model's predictions for the images and for their left-right mirrors
    (--flips: what validation, the test and the exported model score)."""
    return (model(images, training=False) + model(tf.reverse(images, axis=[2]), training=False)) / 2


def scored_model(model: keras.Model, flips: bool) -> keras.Model:
    """The model as it is scored and exported: with --flips, one that averages over mirrors."""
    if not flips:
        return model
    images = keras.Input(INPUT_SHAPE)
    return keras.Model(images, mirror_averaged(model, images), name=f"{model.name}_mirror_averaged")


def build_model(name: str, learning_rate: float, steps_per_epoch: int = 0, epochs: int = 0,
                jit_compile: bool = False, lr_schedule: str = "constant",
                warmup_epochs: int = 0, steps_per_execution: int = 1, adam_beta2: float = 0.999,
                ema_momentum: float = 0.0, sequential=keras.Sequential) -> keras.Model:
    """Build and compile a model. Given the run's length (steps_per_epoch, epochs), the learning
    rate warms up linearly over `warmup_epochs`, then stays (constant) or decays to 1 % (cosine;
    always for "strong").

    `ema_momentum` > 0: the optimizer keeps a moving average of the trainable weights (its
    "average" slots, checkpointed with it); `finalize_variable_values` puts it in the model.
    `sequential`: the model class (train.py passes its own, whose steps skip collectives).
    Under a mixed_float16 policy the layers compute in float16; the output layer stays float32
    so the softmax and the loss are computed in full precision.
    """
    model = MODELS[name](sequential)
    cosine = lr_schedule == "cosine" or name == "strong"
    if steps_per_epoch and epochs and (warmup_epochs or cosine):
        warmup = steps_per_epoch * warmup_epochs
        learning_rate = keras.optimizers.schedules.CosineDecay(  # alpha 1: no decay, warm-up only
            0.0 if warmup else learning_rate, decay_steps=steps_per_epoch * epochs - warmup,
            alpha=0.01 if cosine else 1.0,
            warmup_target=learning_rate if warmup else None, warmup_steps=warmup)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate, beta_2=adam_beta2, use_ema=ema_momentum > 0,
                                        ema_momentum=ema_momentum),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )
    return model
