"""A trained Keras model file as the dense baseline, checked before anything in it is loaded.

A ``.h5``, ``.keras`` or SavedModel file can carry Python code (a ``Lambda`` layer's
bytecode) and can name classes for Keras to look up.  Before deserialising, the stored
config is read as plain JSON and walked (nested models too): ``Lambda`` layers and Python
lambdas need ``model.trust_code=true``; any class that is not a built-in Keras layer needs
``model.custom_objects`` naming the module that defines it, which is then imported as the
explicit opt-in.  The loaded model is not trained: its test accuracy is measured once per
(file content, data, input convention) and cached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import os
import time
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py

# The SavedModel's Keras metadata is a protobuf; its schema ships with tf_keras.
from tf_keras.protobuf import saved_metadata_pb2

from src import data as data_module
from src.baseline import Baseline, baseline_key, content_key
from src.config import ConfigError, ModelConfig, Settings
from src.data import Dataset
from src.keras_env import keras, tf
from src.train import ends_in_softmax, evaluate

log = logging.getLogger(__name__)

CACHE_VERSION = 1
# Classes a functional model uses for TensorFlow ops and for models inside models.
_EXTRA_LAYERS = {"Functional", "Model", "Sequential", "TFOpLambda", "SlicingOpLambda"}
# Where a serialized layer sits inside a model or wrapper config.
_LAYER_KEYS = {"layer", "backward_layer", "cell"}
_LAYER_LIST_KEYS = {"layers", "cells"}
# TensorFlow functions a TFOpLambda layer may name: maths, not I/O or Python callbacks.
_OP_NAMESPACES = ("math.", "nn.", "image.", "linalg.", "signal.", "__operators__.")
_OP_REFUSED = {"print", "py_function", "numpy_function", "py_func", "load_op_library",
               "load_library", "write_file", "read_file"}
_FUNCTION_MODULES = ("activations", "losses", "metrics", "initializers", "regularizers",
                     "constraints")
class ModelFileError(ConfigError):
    """A model file that cannot or must not be loaded; the message names the setting or file."""


def load_model_file(path: str | Path, trust_code: bool = False,
                    custom_objects_module: str | None = None) -> keras.Model:
    """Returns the model stored at path (.keras, .h5 or SavedModel dir) after the safety checks."""
    path = Path(path).expanduser()
    kind, configs = stored_configs(path)
    custom = import_custom_objects(custom_objects_module)
    for config in configs:
        check_config(config, path, trust_code, custom, custom_objects_module)
    try:
        if kind == "keras":
            model = keras.models.load_model(path, custom_objects=custom, compile=False,
                                            safe_mode=not trust_code)
        else:  # legacy h5 and SavedModel take no safe_mode: check_config is the guard
            with keras.saving.custom_object_scope(custom):
                model = keras.models.load_model(path, compile=False)
    except (ValueError, TypeError, KeyError, OSError, AttributeError, RuntimeError,
            tf.errors.OpError) as error:
        detail = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        raise ModelFileError(f"model.path: {path} cannot be loaded as a Keras model "
                             f"({type(error).__name__}: {detail})") from None
    if not isinstance(model, keras.Model):
        raise ModelFileError(f"model.path: {path} holds a {type(model).__name__}, "
                             "not a Keras model")
    return model


# ---------------------------------------------------------------- reading the config
def stored_configs(path: Path) -> tuple[str, list[dict]]:
    """Returns the file's format (keras, h5, savedmodel) and its model configs, as plain JSON."""
    if not path.exists():
        raise ModelFileError(f"model.path: {path} does not exist")
    if path.is_dir():
        return "savedmodel", _savedmodel_configs(path)
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                return "keras", [json.loads(archive.read("config.json"))]
        except (KeyError, zipfile.BadZipFile, OSError, ValueError) as error:
            raise ModelFileError(f"model.path: {path} is a zip without a readable Keras "
                                 f"config.json ({error})") from None
    if h5py.is_hdf5(path):
        try:
            with h5py.File(path, "r") as stored:
                config = stored.attrs.get("model_config")
        except OSError as error:
            raise ModelFileError(f"model.path: {path} is a truncated or corrupt HDF5 file "
                                 f"({error})") from None
        if config is None:
            raise ModelFileError(f"model.path: {path} is an HDF5 file without a model config "
                                 "(weights only?); save the whole model")
        return "h5", [json.loads(config.decode() if isinstance(config, bytes) else config)]
    hint = " (truncated?)" if path.suffix in (".keras", ".h5", ".hdf5") else ""
    raise ModelFileError(f"model.path: {path} is not a Keras model{hint}: expected a .keras "
                         "zip, an .h5 (HDF5) file or a SavedModel directory")


def _savedmodel_configs(path: Path) -> list[dict]:
    """Returns the config of every Keras object listed in a SavedModel's keras_metadata.pb."""
    if not (path / "saved_model.pb").exists():
        raise ModelFileError(f"model.path: {path} is a directory without saved_model.pb, "
                             "not a SavedModel")
    meta_file = path / "keras_metadata.pb"
    if not meta_file.exists():
        raise ModelFileError(f"model.path: {path} is a SavedModel without keras_metadata.pb "
                             "(not saved by Keras); save it with tf_keras")
    metadata = saved_metadata_pb2.SavedMetadata()
    try:
        metadata.ParseFromString(meta_file.read_bytes())
        # Metrics are stored too; only layers and models are rebuilt from their config.
        nodes = [json.loads(node.metadata) for node in metadata.nodes
                 if node.metadata and node.identifier != "_tf_keras_metric"]
    except Exception as error:  # noqa: BLE001 - protobuf's DecodeError and bad JSON alike
        raise ModelFileError(f"model.path: {meta_file} is corrupt ({error})") from None
    if not nodes:
        raise ModelFileError(f"model.path: {meta_file} lists no Keras objects")
    # Every node is one layer (nested ones too) with its own config.
    return [{"class_name": n.get("class_name"), "config": n.get("config") or {},
             "name": n.get("name")} for n in nodes if n.get("class_name")]


# ------------------------------------------------------------------ the safety check
def builtin_layer_names() -> set[str]:
    """Returns the class names of the built-in Keras layers and models."""
    names = {name for name, obj in vars(keras.layers).items()
             if isinstance(obj, type) and issubclass(obj, keras.layers.Layer)}
    return names | _EXTRA_LAYERS


def check_config(config: Any, path: Path, trust_code: bool, custom: Mapping[str, Any],
                 custom_module: str | None) -> None:
    """Raises ModelFileError for a Lambda, Python code or an unknown class in a stored config."""
    builtin = builtin_layer_names()
    for layer_name, entry, is_layer in _serialized_objects(config, "model", True):
        cls, module = entry.get("class_name"), entry.get("module")
        where = f"model.path: {path}: layer {layer_name!r}"
        if cls == "__lambda__" or (is_layer and cls == "Lambda"):
            if not trust_code:
                raise ModelFileError(f"{where} is a Lambda carrying Python code, refused; set "
                                     "model.trust_code=true only if you trust this file")
            continue
        if is_layer and cls not in builtin and cls not in custom \
                and keras.saving.get_registered_object(str(entry.get("registered_name"))) is None:
            hint = f"{custom_module} does not define it" if custom_module else \
                "set model.custom_objects to the module that defines it"
            raise ModelFileError(f"{where} has class {cls}, not a built-in Keras layer; "
                                 f"refused ({hint})")
        if is_layer and cls in ("TFOpLambda", "SlicingOpLambda"):
            _check_op(entry, where)
        if module and not _allowed_module(module, cls, entry, custom, custom_module):
            raise ModelFileError(f"{where} names {module}.{cls}, outside Keras; refused (set "
                                 "model.custom_objects to that module if you trust it)")


def _serialized_objects(node: Any, layer_name: str, is_layer: bool,
                        ) -> Iterator[tuple[str, dict, bool]]:
    """Yields (enclosing layer name, serialized object, is it a layer) over a config tree."""
    if isinstance(node, list):
        for item in node:
            yield from _serialized_objects(item, layer_name, False)
        return
    if not isinstance(node, dict):
        return
    if "class_name" in node:
        inner = node.get("config")
        if is_layer:
            name = (inner.get("name") if isinstance(inner, dict) else None) or node.get("name")
            layer_name = name or layer_name
        yield layer_name, node, is_layer
    for key, value in node.items():
        if key in _LAYER_LIST_KEYS and isinstance(value, list):
            for item in value:
                yield from _serialized_objects(item, layer_name, True)
        else:
            yield from _serialized_objects(value, layer_name, key in _LAYER_KEYS)


def _check_op(entry: dict, where: str) -> None:
    """Refuses a TFOpLambda naming a TensorFlow function outside plain maths (I/O, callbacks)."""
    function = str((entry.get("config") or {}).get("function", ""))
    plain = "." not in function and function not in _OP_REFUSED
    if not (plain or function.startswith(_OP_NAMESPACES)):
        raise ModelFileError(f"{where} calls tf.{function}, refused (I/O and Python-callback "
                             "ops are not loaded)")


def _allowed_module(module: str, cls: str | None, entry: dict, custom: Mapping[str, Any],
                    custom_module: str | None) -> bool:
    """Returns whether a .keras config may make Keras import module to find cls."""
    if module in ("keras", "tf_keras") or module.startswith(("keras.", "tf_keras.")):
        return True
    if custom_module and (module == custom_module or module.startswith(custom_module + ".")):
        return True
    if module == "builtins":  # a Keras function stored by name, e.g. an activation
        name = entry.get("config")
        return isinstance(name, str) and any(
            hasattr(getattr(keras, group), name) for group in _FUNCTION_MODULES)
    return cls in custom


def import_custom_objects(module_name: str | None) -> dict[str, Any]:
    """Returns the classes defined by the user's module (imported only when it is named)."""
    if not module_name:
        return {}
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ModelFileError(f"model.custom_objects: cannot import {module_name} "
                             f"({error})") from None
    return {name: obj for name, obj in vars(module).items()
            if isinstance(obj, type) and obj.__module__ == module.__name__}


# --------------------------------------------------------------- the dense baseline
def baseline_from_file(settings: Settings, dataset: Dataset | None = None,
                       ) -> tuple[Baseline, Dataset]:
    """Returns the loaded model as the dense baseline and the data fitted to its input.

    dataset: already loaded data, else data.load is called at the model's image size.
    """
    cfg = settings.model
    model = load_model_file(cfg.path, cfg.trust_code, cfg.custom_objects)
    height, width, channels = input_shape(model, cfg.path)
    if dataset is None:
        size = height if height and height == width else settings.data.image_size
        data_cfg = dataclasses.replace(settings.data, image_size=size)
        dataset = data_module.load(data_cfg, settings.paths.cache_dir)
    dataset = data_module.fit_to_input(dataset, height, width, channels, cfg.input_scale)
    check_outputs(model, dataset, cfg.path)
    check_head(model, cfg, settings)
    key = file_key(cfg, dataset)
    start = time.perf_counter()
    cached = _cached_accuracy(settings.paths.cache_dir, key)
    accuracy = cached if cached is not None else evaluate(model, dataset.x_test, dataset.y_test)
    seconds = time.perf_counter() - start
    if cached is None:
        _store_accuracy(settings.paths.cache_dir, key, accuracy)
    warn_if_chance(accuracy, dataset.num_classes, cfg.path)
    return Baseline(model, key, cached is not None, {}, accuracy, 0.0, seconds), dataset


def input_shape(model: keras.Model, path: str) -> tuple[int | None, int | None, int]:
    """Returns the (height, width, channels) the model takes, or raises naming model.path."""
    if len(model.inputs) != 1:
        raise ModelFileError(f"model.path: {path} takes {len(model.inputs)} inputs; an image "
                             "classifier takes one")
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or shape[-1] not in (1, 3):
        raise ModelFileError(f"model.path: {path} takes inputs of shape {shape}, which images "
                             "(N, height, width, 1 or 3 channels) cannot fit")
    return shape[1], shape[2], shape[3]


def check_outputs(model: keras.Model, dataset: Dataset, path: str) -> None:
    """Raises ModelFileError unless the model has one output per class of the data."""
    shapes = [tuple(output.shape) for output in model.outputs]
    if len(shapes) != 1 or len(shapes[0]) != 2 or shapes[0][1] != dataset.num_classes:
        shown = shapes[0][1:] if len(shapes) == 1 else shapes
        raise ModelFileError(f"model.path: {path} has outputs of shape {shown}, but the data "
                             f"have {dataset.num_classes} classes")


def check_head(model: keras.Model, cfg: ModelConfig, settings: Settings) -> None:
    """Refuses a declared head that the last layer contradicts, when fine-tuning needs it."""
    found = "softmax" if ends_in_softmax(model) else "logits"
    trains = settings.prune.method == "tfmot" or settings.prune.finetune_epochs > 0
    if cfg.head not in ("auto", found) and trains:
        raise ModelFileError(f"model.head: set to {cfg.head}, but the model's last layer "
                             f"{model.layers[-1].name!r} gives {found}; fine-tuning takes its "
                             "loss from the last layer")


def warn_if_chance(accuracy: float, num_classes: int, path: str) -> bool:
    """Logs a warning and returns True when the dense accuracy is near chance."""
    if accuracy >= 1.5 / num_classes:
        return False
    log.warning("model.path: %s scores %.1f%% on the test split, near chance (%.1f%% for %d "
                "classes): check the class order (data.classes gives the label order) and "
                "model.input_scale (raw 0..255, unit 0..1, symmetric -1..1)",
                path, 100 * accuracy, 100 / num_classes, num_classes)
    return True


def file_key(cfg: ModelConfig, dataset: Dataset) -> str:
    """Returns the baseline key: the file's content, the fitted data and the input convention."""
    content = {"version": CACHE_VERSION, "file_sha256": file_sha256(Path(cfg.path).expanduser()),
               "data_fingerprint": dataset.fingerprint, "input_scale": cfg.input_scale,
               "tf": tf.__version__}
    return content_key(content)


def file_sha256(path: Path) -> str:
    """Returns the sha256 of a file, or of a directory's relative names and file contents."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file != path:
            digest.update(f"{file.relative_to(path)}\n".encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _cached_accuracy(cache_dir: str, key: str) -> float | None:
    try:
        return float(json.loads((Path(cache_dir) / "model_files" / f"{key}.json").read_text())
                     ["test_accuracy"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store_accuracy(cache_dir: str, key: str, accuracy: float) -> None:
    folder = Path(cache_dir) / "model_files"
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f".{key}.{os.getpid()}.tmp"
    staging.write_text(json.dumps({"key": key, "test_accuracy": accuracy}))
    staging.replace(folder / f"{key}.json")





def dense_source(settings: Settings) -> tuple[Baseline | None, Dataset, str]:
    """Returns the loaded model file's baseline (None for a built-in model, trained or cached
    later), the data (fitted to the file's input), and the dense baseline's key."""
    if settings.model.name == "file":
        own, dataset = baseline_from_file(settings)
        return own, dataset, own.key
    dataset = data_module.load(settings.data, settings.paths.cache_dir)
    return None, dataset, baseline_key(dataset, settings.data, settings.model, settings.train)
