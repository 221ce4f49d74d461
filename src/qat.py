"""Quantization-aware training (quant.qat_epochs): fine-tune with int8 fake quantization, so the
weights learn the rounding the int8 export applies, then export from the trained ranges.

tfmot's 8-bit scheme wraps every layer it knows (convolutions, activations, adds, pooling,
dense, and a BatchNormalization after a convolution, folded into it); the others (a model's
Rescaling of its input pixels) stay float and are quantized at export from the calibration
images, like a post-training export. A model pruned by magnitude keeps its zeros: they are held
after every step, as magnitude pruning's fine-tuning holds them (tfmot's prune-preserving
scheme refuses a model with layers it does not wrap).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import tensorflow_model_optimization as tfmot
from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
    default_8bit_quantize_registry,
)

from src import train
from src.checkpoint import EpochCheckpoint
from src.config import ADDED_LATER, ConfigError, Settings
from src.data import Dataset
from src.distill import Distillation
from src.keras_env import keras
from src.prune.magnitude import HoldMasks

quantization = tfmot.quantization.keras
CONVOLUTIONS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)


def sparse_weights(settings: Settings) -> bool:
    """Returns True when the run's pruning leaves zero weights that training must keep."""
    prune = settings.prune
    return prune.method in ("flat", "layer", "tfmot") or \
        (prune.method == "channel" and prune.magnitude_rate > 0)


def quantize_aware(model: keras.Model) -> keras.Model:
    """Returns a copy of model with fake quantization around every layer tfmot's 8-bit scheme
    supports (same weights).

    Raises ConfigError naming the layer when tfmot cannot quantize the model (a nested model).
    """
    registry = default_8bit_quantize_registry.Default8BitQuantizeRegistry()
    # tfmot folds a BatchNormalization into the convolution before it (as the converter does);
    # one after anything else it cannot quantize.
    folded = {layer.name for layer in model.layers
              if isinstance(layer, keras.layers.BatchNormalization) and isinstance(
                  layer.inbound_nodes[0].inbound_layers, CONVOLUTIONS)}

    def annotate(layer: keras.layers.Layer) -> keras.layers.Layer:
        copy = layer.__class__.from_config(layer.get_config())
        wanted = registry.supports(layer) or layer.name in folded
        return quantization.quantize_annotate_layer(copy) if wanted else copy

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            raise ConfigError(f"quant.qat_epochs: tfmot cannot quantize a nested model "
                              f"({layer.name!r}); flatten it or use quant.qat_epochs=0")
    annotated = keras.models.clone_model(model, clone_function=annotate)
    annotated.set_weights(model.get_weights())
    try:
        with quantization.quantize_scope():
            return quantization.quantize_apply(annotated)
    except (RuntimeError, ValueError, TypeError) as error:
        raise ConfigError(f"quant.qat_epochs: tfmot cannot quantize this model "
                          f"({str(error).splitlines()[0]})") from None


def zeros_held(aware: keras.Model) -> HoldMasks:
    """Returns the callback that keeps every kernel weight of aware that is zero now at zero."""
    kernels = [kernel for layer in aware.layers
               for kernel in (getattr(getattr(layer, "layer", layer), name, None)
                              for name in ("kernel", "depthwise_kernel"))
               if kernel is not None]
    masks = [(kernel.numpy() != 0).astype(kernel.dtype.as_numpy_dtype) for kernel in kernels]
    return HoldMasks(kernels, masks)


def float_weights_into(aware: keras.Model, model: keras.Model) -> None:
    """Copies the trained float weights of aware (quantize_aware's copy of model) into model,
    leaving out the quantizers' ranges: model is then a plain Keras model again."""
    wrappers = {layer.name: layer for layer in aware.layers}
    for layer in model.layers:
        if not layer.weights:
            continue
        wrapper = wrappers.get(f"quant_{layer.name}", wrappers.get(layer.name))
        # A wrapper's variables are '<wrapper>/<weight>:0' ('quant_stem_conv/kernel:0').
        trained = {_short(variable.name): variable for variable in wrapper.weights}
        layer.set_weights([trained[_short(variable.name)].numpy() for variable in layer.weights])


def _short(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def fine_tune(model: keras.Model, settings: Settings, dataset: Dataset,
              callbacks: Sequence[keras.callbacks.Callback] = (),
              distill: Distillation | None = None,
              checkpoint: EpochCheckpoint | None = None) -> tuple[keras.Model, dict]:
    """Trains model quantization-aware for quant.qat_epochs and returns (the fake-quantized
    model, to export from, its history); model gets the trained float weights.

    The recipe is the run's training recipe (batch, optimizer, weight decay, augmentation,
    distillation) with a cosine decay from quant.qat_lr to zero and no warm-up or averaging.
    """
    aware = quantize_aware(model)
    held = [zeros_held(aware)] if sparse_weights(settings) else []
    recipe = dataclasses.replace(settings.train, schedule="cosine", swa_start=None,
                                 swa_lr=ADDED_LATER["train.swa_lr"])
    history = train.fit(aware, dataset.x_train, dataset.y_train, dataset.x_val, dataset.y_val,
                        dataset.num_classes, recipe, epochs=settings.quant.qat_epochs,
                        lr=settings.quant.qat_lr, warmup_epochs=0.0,
                        callbacks=[*held, *callbacks],
                        checkpoint=checkpoint, distill=distill)
    float_weights_into(aware, model)
    return aware, history
