"""Image classifiers as flat Keras 2 functional models taking raw 0..255 pixels."""

from __future__ import annotations

from src.config import ModelConfig
from src.keras_env import keras

layers = keras.layers


def build(cfg: ModelConfig, num_classes: int) -> keras.Model:
    """Returns an uncompiled, randomly initialised model for cfg.name."""
    builders = {
        "mobilenetv2": _mobilenetv2,
        "mobilenetv2_cifar": _mobilenetv2_cifar,
        "resnet8": _resnet8,
    }
    inputs = keras.Input((cfg.input_size, cfg.input_size, 3), name="image")
    # Scaling inside the model means the exported TFLite file takes raw pixels.
    scaled = layers.Rescaling(1 / 127.5, offset=-1.0, name="scale")(inputs)
    return builders[cfg.name](cfg, inputs, scaled, num_classes)


def _mobilenetv2(cfg: ModelConfig, inputs, scaled, num_classes: int) -> keras.Model:
    """Returns the stock keras.applications MobileNetV2 (the reference study's model)."""
    model = keras.applications.MobileNetV2(
        input_tensor=scaled, alpha=cfg.alpha, weights=None, classes=num_classes,
        include_top=True, classifier_activation="softmax",
    )
    if cfg.bn_momentum is not None:  # keras.applications fixes it at 0.999 otherwise
        for layer in model.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.momentum = cfg.bn_momentum
    return model


def _make_divisible(value: float, divisor: int = 8) -> int:
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _mobilenetv2_cifar(cfg: ModelConfig, inputs, scaled, num_classes: int) -> keras.Model:
    """Returns MobileNetV2 with configurable stem and stage strides for small images."""
    # (expansion, output channels, repeats) of the seven inverted-residual stages.
    stages = [(1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1)]
    momentum = cfg.bn_momentum or 0.99
    x = layers.Conv2D(_make_divisible(32 * cfg.alpha), 3, strides=cfg.stem_stride,
                      padding="same", use_bias=False, name="stem_conv")(scaled)
    x = layers.BatchNormalization(momentum=momentum, name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_relu")(x)
    block = 0
    for (expansion, channels, repeats), stride in zip(stages, cfg.stage_strides):
        for i in range(repeats):
            x = _inverted_residual(x, expansion, _make_divisible(channels * cfg.alpha),
                                   stride if i == 0 else 1, momentum, f"block{block}")
            block += 1
    head = _make_divisible(1280 * max(1.0, cfg.alpha))
    x = layers.Conv2D(head, 1, use_bias=False, name="head_conv")(x)
    x = layers.BatchNormalization(momentum=momentum, name="head_bn")(x)
    x = layers.ReLU(6.0, name="head_relu")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    if cfg.dropout:
        x = layers.Dropout(cfg.dropout, name="dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="mobilenetv2_cifar")


def _inverted_residual(x, expansion: int, channels: int, stride: int, momentum: float, name: str):
    """Returns the output of one MobileNetV2 inverted-residual block."""
    in_channels = x.shape[-1]
    y = x
    if expansion != 1:
        y = layers.Conv2D(in_channels * expansion, 1, use_bias=False, name=f"{name}_expand")(y)
        y = layers.BatchNormalization(momentum=momentum, name=f"{name}_expand_bn")(y)
        y = layers.ReLU(6.0, name=f"{name}_expand_relu")(y)
    y = layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False,
                               name=f"{name}_depthwise")(y)
    y = layers.BatchNormalization(momentum=momentum, name=f"{name}_depthwise_bn")(y)
    y = layers.ReLU(6.0, name=f"{name}_depthwise_relu")(y)
    y = layers.Conv2D(channels, 1, use_bias=False, name=f"{name}_project")(y)
    y = layers.BatchNormalization(momentum=momentum, name=f"{name}_project_bn")(y)
    if stride == 1 and in_channels == channels:
        y = layers.Add(name=f"{name}_add")([x, y])
    return y


def _resnet8(cfg: ModelConfig, inputs, scaled, num_classes: int) -> keras.Model:
    """Returns ResNet-8 as in the MLPerf Tiny image-classification benchmark."""
    momentum = cfg.bn_momentum or 0.99
    f1, f2, f3 = (max(1, round(f * cfg.alpha)) for f in cfg.filters)  # alpha: width multiplier

    def conv_bn(x, filters: int, stride: int, name: str, relu: bool = True):
        x = layers.Conv2D(filters, 3, strides=stride, padding="same",
                          kernel_initializer="he_normal", name=f"{name}_conv")(x)
        x = layers.BatchNormalization(momentum=momentum, name=f"{name}_bn")(x)
        return layers.Activation("relu", name=f"{name}_relu")(x) if relu else x

    x = conv_bn(scaled, f1, 1, "stem")
    for stage, (filters, stride) in enumerate([(f1, 1), (f2, 2), (f3, 2)], start=1):
        y = conv_bn(x, filters, stride, f"stage{stage}_a")
        y = conv_bn(y, filters, 1, f"stage{stage}_b", relu=False)
        if stride != 1 or x.shape[-1] != filters:
            x = layers.Conv2D(filters, 1, strides=stride, kernel_initializer="he_normal",
                              name=f"stage{stage}_shortcut")(x)
        x = layers.Add(name=f"stage{stage}_add")([x, y])
        x = layers.Activation("relu", name=f"stage{stage}_out")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="resnet8")
