"""Model builders: the stride facts that matter on 32x32 images, and the width multiplier."""

from __future__ import annotations

import pytest

from src import models
from src.config import ModelConfig


def head_size(model) -> int:
    pool = next(layer for layer in model.layers if "GlobalAveragePooling" in type(layer).__name__)
    return pool.input_shape[1]


@pytest.mark.parametrize("name,head", [("mobilenetv2", 1), ("mobilenetv2_cifar", 4),
                                       ("resnet8", 8)])
def test_32x32_reaches_the_head_at_the_expected_size(name, head):
    model = models.build(ModelConfig(name=name, alpha=0.35), num_classes=10)
    assert head_size(model) == head
    assert model.output_shape == (None, 10)


def test_resnet8_matches_the_mlperf_tiny_reference_and_scales_with_alpha():
    assert models.build(ModelConfig(name="resnet8"), 10).count_params() == 78_666
    half = models.build(ModelConfig(name="resnet8", alpha=0.5), 10)
    assert half.get_layer("stem_conv").filters == 8


def test_stage_strides_are_configurable():
    stock_like = ModelConfig(name="mobilenetv2_cifar", alpha=0.35, stem_stride=2,
                             stage_strides=[1, 2, 2, 2, 1, 2, 1])
    assert head_size(models.build(stock_like, 10)) == 1
