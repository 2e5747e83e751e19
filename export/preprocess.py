"""Input scaling of the keras.applications families, built into the graph so callers only ever send uint8 RGB."""
from __future__ import annotations

import tensorflow as tf

from gradcam_engine.engine.contract import PREPROCESSING

_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


def preprocess(images: tf.Tensor, mode: str, dtype: tf.DType = tf.float32) -> tf.Tensor:
    """uint8 RGB [N, H, W, 3] -> the float input the model was trained on."""
    if mode not in PREPROCESSING:
        raise ValueError(f"unknown preprocessing {mode!r}; choose one of {', '.join(PREPROCESSING)}")
    x = tf.cast(images, tf.float32)
    if mode == "caffe":  # ResNet50, VGG: BGR order, ImageNet mean subtracted, no scaling
        x = x[..., ::-1] - tf.constant(_CAFFE_BGR_MEAN, tf.float32)
    elif mode == "tf":  # MobileNet, Inception: [-1, 1]
        x = x / 127.5 - 1.0
    elif mode == "torch":  # DenseNet: [0, 1] then ImageNet mean/std
        x = (x / 255.0 - tf.constant(_TORCH_MEAN, tf.float32)) / tf.constant(_TORCH_STD, tf.float32)
    return tf.cast(x, dtype) if dtype != tf.float32 else x
