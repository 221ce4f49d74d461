"""Quantization-aware training (quant.qat_epochs): fine-tune with int8 fake quantization, so the
weights learn the rounding the int8 export applies, then export from the trained model.

tfmot's 8-bit scheme wraps every layer it knows (convolutions, activations, adds, pooling,
dense, and a BatchNormalization right after a convolution: no fake quantization between the
two, as the converter folds them); the others (a model's Rescaling of its input pixels) stay
float and are quantized at export from the calibration images, like a post-training export.
Activation ranges are moving averages of the training batches' minima and maxima. A model
pruned by magnitude keeps its zeros: they are held after every step, as magnitude pruning's
fine-tuning holds them (tfmot's prune-preserving scheme refuses layers it does not wrap).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from src import train
from src.checkpoint import EpochCheckpoint
from src.config import ADDED_LATER, ConfigError, Settings
from src.data import Dataset
from src.distill import Distillation
from src.keras_env import keras, tf, tfmot
from src.prune.common import KERNEL_ATTRIBUTE, kernel_layers
from src.prune.magnitude import HoldMasks

quantization = tfmot.quantization.keras
# Bumped when a change to this module changes what a quantization-aware training learns: its
# resumable checkpoints (keyed by it) are then not restored into a different graph.
QAT_VERSION = 1


def sparse_weights(settings: Settings) -> bool:
    """Returns True when the run's pruning leaves zero weights that training must keep."""
    prune = settings.prune
    return prune.method in ("flat", "layer", "tfmot") or \
        (prune.method == "channel" and prune.magnitude_rate > 0)


def quantize_aware(model: keras.Model) -> keras.Model:
    """Returns a copy of model with fake quantization around every layer tfmot's 8-bit scheme
    supports (same weights).

    Raises ConfigError when tfmot cannot quantize the model (a nested model, by name).
    """
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            raise ConfigError(f"quant.qat_epochs: tfmot cannot quantize a nested model "
                              f"({layer.name!r}); flatten it or use quant.qat_epochs=0")
    registry = quantization.default_8bit.Default8BitQuantizeRegistry()
    folded = {layer.name for layer in model.layers if _after_its_convolution(layer)}

    def annotate(layer: keras.layers.Layer) -> keras.layers.Layer:
        copy = layer.__class__.from_config(layer.get_config())
        wanted = registry.supports(layer) or layer.name in folded
        return quantization.quantize_annotate_layer(copy) if wanted else copy

    annotated = keras.models.clone_model(model, clone_function=annotate)
    annotated.set_weights(model.get_weights())
    try:
        with quantization.quantize_scope():
            return quantization.quantize_apply(annotated)
    except RuntimeError as error:  # tfmot's refusal of a layer it has no configuration for
        raise ConfigError(f"quant.qat_epochs: tfmot cannot quantize this model "
                          f"({str(error).splitlines()[0]})") from None


def _after_its_convolution(layer: keras.layers.Layer) -> bool:
    """Returns True for a BatchNormalization that tfmot quantizes with the convolution before
    it (its Conv2D/DepthwiseConv2D + BatchNormalization pattern): a linear convolution whose
    only consumer it is. tfmot refuses any other BatchNormalization."""
    if type(layer).__name__ != "BatchNormalization":
        return False
    source = layer.inbound_nodes[0].inbound_layers
    return type(source).__name__ in ("Conv2D", "DepthwiseConv2D") and \
        source.get_config().get("activation") == "linear" and len(source.outbound_nodes) == 1


def wrapper_weights(aware: keras.Model, name: str) -> dict[str, tf.Variable]:
    """Returns the variables of the wrapper of the layer called name in a quantize_aware model,
    by their short name ('kernel', 'bias', 'kernel_min', ...).

    The wrapped layer's attributes are no guide: a wrapper sets `kernel` to its fake-quantized
    tensor, so only the wrapper lists the variables.
    """
    wrapper = next(layer for layer in aware.layers if layer.name in (f"quant_{name}", name))
    return {_short(variable.name): variable for variable in wrapper.weights}


def _short(name: str) -> str:
    """Returns a variable's name without its layer and index: 'quant_stem_conv/kernel:0' ->
    'kernel'."""
    return name.rsplit("/", 1)[-1].split(":")[0]


class ZerosHeld(HoldMasks):
    """Holds the kernel weights that are zero when training begins (after a resume's restore)
    at zero after every step."""

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.masks = [tf.constant((kernel.numpy() != 0).astype(kernel.dtype.as_numpy_dtype))
                      for kernel in self.kernels]


def zeros_held(aware: keras.Model, model: keras.Model) -> ZerosHeld:
    """Returns the callback holding the zeros of every kernel of aware, quantize_aware's copy
    of model."""
    return ZerosHeld([wrapper_weights(aware, name)[KERNEL_ATTRIBUTE[type(layer).__name__]]
                      for name, layer in kernel_layers(model)], [])


def float_weights_into(aware: keras.Model, model: keras.Model) -> None:
    """Copies the trained float weights of aware (quantize_aware's copy of model) into model,
    leaving out the quantizers' ranges: model is then a plain Keras model again."""
    for layer in model.layers:
        if layer.weights:
            trained = wrapper_weights(aware, layer.name)
            layer.set_weights([trained[_short(variable.name)].numpy()
                               for variable in layer.weights])


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
    held = [zeros_held(aware, model)] if sparse_weights(settings) else []
    recipe = dataclasses.replace(settings.train, schedule="cosine", swa_start=None,
                                 swa_lr=ADDED_LATER["train.swa_lr"])
    history = train.fit(aware, dataset.x_train, dataset.y_train, dataset.x_val, dataset.y_val,
                        dataset.num_classes, recipe, epochs=settings.quant.qat_epochs,
                        lr=settings.quant.qat_lr, warmup_epochs=0.0,
                        callbacks=[*held, *callbacks], checkpoint=checkpoint, distill=distill)
    float_weights_into(aware, model)
    return aware, history
