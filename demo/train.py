"""Train the small demo classifier on synthetic scenes and save it as a .keras file.

The model is built so Grad-CAM has something sharp to look at: a plain conv stack down to a 12x12 map (the conv layer
named ``last_conv``, then its batch norm and ``last_conv_relu``), global average pooling and one softmax layer.
Automatic target selection picks ``last_conv_relu``, the last 4-D output; ``last_conv`` works as a named target too.
Run ``python -m demo.train --out demo/model.keras`` to rebuild the shipped model; the run is seeded, so it reproduces
on the same machine and library versions.
"""
from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from gradcam_engine.demo.scenes import CLASS_NAMES, JPEG_QUALITY, make_scenes

LAST_CONV = "last_conv"
LAST_CONV_RELU = f"{LAST_CONV}_relu"
IMAGE_SIZE = 96
_VAL_SEED_OFFSET = 1_000_003  # keeps validation scenes disjoint from any training seed a user is likely to pick
_JPEG_SHARE = 0.5  # share of training scenes seen through JPEG, as the demo's image files are
_JPEG_QUALITIES = (70, 96)  # training JPEG quality range, upper bound exclusive


def build_model(size: int = IMAGE_SIZE, n_classes: int = len(CLASS_NAMES)) -> keras.Model:
    """A small functional CNN on raw 0..255 RGB; its ``last_conv`` map (size / 8 per side) is where Grad-CAM looks."""
    inputs = keras.Input((size, size, 3), name="image")
    x = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    for i, filters in enumerate((16, 32, 48)):
        x = _conv_bn_relu(x, filters, f"conv{i + 1}")
        x = keras.layers.MaxPooling2D(2, name=f"pool{i + 1}")(x)
    x = _conv_bn_relu(x, 64, LAST_CONV)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dropout(0.2, name="dropout")(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="demo_shapes_cnn")


def _conv_bn_relu(x: keras.KerasTensor, filters: int, name: str) -> keras.KerasTensor:
    """3x3 conv, batch norm, ReLU: batch norm on every conv keeps short CPU runs from stalling on dead units."""
    x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer="he_normal", name=name)(x)
    # momentum 0.9: the moving statistics settle within the few hundred steps a short run takes
    x = keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def _dataset(images: np.ndarray, labels: np.ndarray, batch_size: int, shuffle_seed: int | None) -> tf.data.Dataset:
    """Batches of float images kept as uint8 until batching, so thousands of scenes fit in little memory."""
    ds = tf.data.Dataset.from_tensor_slices((images, labels.astype(np.int32)))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(images), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(lambda x, y: (tf.cast(x, tf.float32), y))
    return ds.prefetch(2)


def jpeg_roundtrip(images: np.ndarray, qualities: np.ndarray | int) -> np.ndarray:
    """Encode and decode each image as JPEG, so training and scoring see the artefacts real image files carry."""
    qualities = np.broadcast_to(np.asarray(qualities, dtype=np.int64), (len(images),))
    out = np.empty_like(images)
    for i, (image, quality) in enumerate(zip(images, qualities)):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        out[i] = np.asarray(Image.open(buf).convert("RGB"))
    return out


def train(
    out: Path,
    n_train: int = 6000,
    epochs: int = 5,
    seed: int = 0,
    *,
    n_val: int = 600,
    size: int = IMAGE_SIZE,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    verbose: int = 0,
) -> dict:
    """Train on freshly generated scenes and save the model, so the demo ships a classifier it can rebuild itself.

    Half the training scenes go through a JPEG round trip, as the demo's files do. Returns the held-out validation
    accuracy on raw arrays and on JPEG files (quality 90), with the run's size and timing.
    """
    keras.utils.set_random_seed(seed)
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    x_train, y_train, _ = make_scenes(n_train, seed=seed, size=size)
    rng = np.random.default_rng((seed, 1))  # a stream apart from the one that drew the scenes
    through_jpeg = rng.random(n_train) < _JPEG_SHARE
    x_train[through_jpeg] = jpeg_roundtrip(x_train[through_jpeg], rng.integers(*_JPEG_QUALITIES, through_jpeg.sum()))
    x_val, y_val, _ = make_scenes(n_val, seed=seed + _VAL_SEED_OFFSET, size=size)
    x_val_jpeg = jpeg_roundtrip(x_val, JPEG_QUALITY)
    t_data = time.perf_counter() - t0

    model = build_model(size, len(CLASS_NAMES))
    steps = epochs * int(np.ceil(n_train / batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(steps, 1), alpha=0.05)
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    t1 = time.perf_counter()
    history = model.fit(
        _dataset(x_train, y_train, batch_size, shuffle_seed=seed),
        epochs=epochs,
        shuffle=False,  # the dataset shuffles itself, seeded
        verbose=verbose,
    )
    t_fit = time.perf_counter() - t1
    val_loss, val_acc = model.evaluate(_dataset(x_val, y_val, 256, shuffle_seed=None), verbose=0)
    _, val_acc_jpeg = model.evaluate(_dataset(x_val_jpeg, y_val, 256, shuffle_seed=None), verbose=0)

    # Ship weights only: a fresh uncompiled copy keeps the optimizer state out of the file.
    shipped = build_model(size, len(CLASS_NAMES))
    shipped.set_weights(model.get_weights())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shipped.save(out)
    return {
        "out": str(out),
        "val_accuracy": float(val_acc),
        "val_loss": float(val_loss),
        "val_accuracy_jpeg": float(val_acc_jpeg),
        "train_accuracy": float(history.history["accuracy"][-1]),
        "n_train": n_train,
        "n_val": n_val,
        "epochs": epochs,
        "seed": seed,
        "params": int(shipped.count_params()),
        "file_bytes": out.stat().st_size,
        "data_seconds": round(t_data, 2),
        "fit_seconds": round(t_fit, 2),
        "total_seconds": round(time.perf_counter() - t0, 2),
        "cpu_seconds": round(time.process_time() - cpu0, 2),
    }


def main(argv: list[str] | None = None) -> None:
    """Command line entry point: train, save and print the run's report as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("model.keras"))
    parser.add_argument("--n-train", type=int, default=6000)
    parser.add_argument("--n-val", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", type=int, default=2)
    args = parser.parse_args(argv)
    report = train(
        args.out,
        args.n_train,
        args.epochs,
        args.seed,
        n_val=args.n_val,
        batch_size=args.batch_size,
        verbose=args.verbose,
    )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
