"""Datasets as uint8 arrays: CIFAR-10 (local or Keras download), image folders, .npz, synthetic.

Every loader returns a ``Dataset`` with train / validation / test splits.  Decoding
an archive is slow, so decoded arrays are cached by the source's fingerprint.
``fit_to_input`` then fits a dataset to a loaded model's input (size, channels, scale).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from src.config import DataConfig

NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
INPUT_SCALES = {"raw": (1.0, 0.0), "unit": (1 / 255, 0.0), "symmetric": (1 / 127.5, -1.0)}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)


class DataError(ValueError):
    """A dataset that cannot be read; the message names the file."""


@dataclass
class Dataset:
    """Image splits as NHWC arrays with integer labels.

    uint8 RGB pixels as loaded; ``fit_to_input`` may change size and channels, and turns
    them into float32 in the model's input scale when that is not raw pixels.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]
    fingerprint: str
    train_fingerprint: str = ""  # the train/validation part only (the baseline cache key)

    @property
    def num_classes(self) -> int:
        """Returns the number of classes."""
        return len(self.class_names)


def load(cfg: DataConfig, cache_dir: str | Path) -> Dataset:
    """Returns the configured dataset, split into train / validation / test."""
    if cfg.name == "synthetic":
        arrays, classes, source = synthetic_arrays(cfg), [str(i) for i in range(cfg.num_classes)], \
            f"synthetic:{cfg.num_classes}:{cfg.n_train}:{cfg.n_test}:{cfg.noise}:{cfg.seed}"
    elif cfg.name == "npz":
        path = Path(cfg.path).expanduser()
        source = f"npz:{fingerprint_source(path)}"
        arrays, classes = read_npz(path, cfg.classes)
    elif cfg.path:
        arrays, classes, source = _cached_local(Path(cfg.path).expanduser(), cfg.image_size,
                                                Path(cache_dir))
    elif cfg.name == "cifar10":
        arrays, classes, source = _keras_cifar10(), list(CIFAR10_CLASSES), "keras:cifar10"
    else:
        raise DataError(f"data.path: {cfg.name} needs a path")
    if cfg.classes is not None and cfg.name == "image_folder":
        arrays, classes = in_class_order(arrays, classes, cfg.classes, cfg.path)
        source = f"{source}|{','.join(classes)}"
    x_train, y_train, x_test, y_test = arrays
    if x_train.shape[1:3] != (cfg.image_size, cfg.image_size):
        x_train, x_test = (resize(x, cfg.image_size) for x in (x_train, x_test))
    x_train, y_train = subsample(x_train, y_train, cfg.limit_train)
    x_test, y_test = subsample(x_test, y_test, cfg.limit_test)
    (x_train, y_train), (x_val, y_val) = split_validation(x_train, y_train, cfg.val_fraction)
    digest = hashlib.sha256(
        f"{source}|{cfg.image_size}|{cfg.val_fraction}|{cfg.limit_train}|{cfg.limit_test}".encode()
    ).hexdigest()[:16]
    # Synthetic train images are drawn before the test ones, so n_test does not change them.
    train_source = f"synthetic:{cfg.num_classes}:{cfg.n_train}:{cfg.noise}:{cfg.seed}" \
        if cfg.name == "synthetic" else source
    train_digest = hashlib.sha256(f"{train_source}|{cfg.image_size}|{cfg.val_fraction}|"
                                  f"{cfg.limit_train}".encode()).hexdigest()[:16]
    return Dataset(x_train, y_train, x_val, y_val, x_test, y_test, classes, digest, train_digest)


def subsample(x: np.ndarray, y: np.ndarray, limit: int | None, seed: int = 0):
    """Returns a fixed random subset of `limit` examples (files are often sorted by class)."""
    if limit is None or limit >= len(x):
        return x, y
    keep = np.sort(np.random.default_rng(seed).permutation(len(x))[:limit])
    return x[keep], y[keep]


def split_validation(
    x: np.ndarray, y: np.ndarray, fraction: float, seed: int = 0
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Returns (train, validation) with a fixed-seed, class-stratified validation split."""
    rng = np.random.default_rng(seed)
    val_idx = []
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        take = min(int(round(len(members) * fraction)), len(members) - 1)  # keep one to train
        val_idx.extend(rng.permutation(members)[:take])
    is_val = np.zeros(len(y), dtype=bool)
    is_val[val_idx] = True
    return (x[~is_val], y[~is_val]), (x[is_val], y[is_val])


def synthetic_arrays(cfg: DataConfig) -> tuple[np.ndarray, ...]:
    """Returns learnable synthetic data: each class a colour and stripe pattern, plus noise."""
    rng = np.random.default_rng(cfg.seed)
    size = cfg.image_size
    grid = np.linspace(0, 2 * np.pi, size, dtype=np.float32)
    prototypes = []
    for k in range(cfg.num_classes):
        colour = rng.uniform(0.2, 0.8, size=3).astype(np.float32)
        freq = 1 + k % 4
        waves = np.sin(freq * grid[:, None] + (k // 4) * grid[None, :] + k)
        prototypes.append(0.5 * colour[None, None, :] + 0.3 * waves[..., None])

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(n) % cfg.num_classes
        rng.shuffle(labels)
        noise = rng.normal(0, cfg.noise * 0.25, size=(n, size, size, 3)).astype(np.float32)
        images = np.stack([prototypes[k] for k in labels]) + noise
        return np.clip((images + 0.2) * 255, 0, 255).astype(np.uint8), labels.astype(np.int64)

    x_train, y_train = draw(cfg.n_train)
    x_test, y_test = draw(cfg.n_test)
    return x_train, y_train, x_test, y_test


def resize(images: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Returns the uint8 images resized to size x size or (height, width) (bilinear)."""
    height, width = (size, size) if isinstance(size, int) else size
    return np.stack([
        np.asarray(Image.fromarray(img).resize((width, height), Image.BILINEAR)) for img in images
    ])


# ----------------------------------------------------------------- a model's input
def scale_images(x: np.ndarray, input_scale: str) -> np.ndarray:
    """Returns 0..255 pixels as float32 in a model's input scale: raw, unit (0..1), symmetric."""
    factor, offset = INPUT_SCALES[input_scale]
    scaled = x.astype(np.float32)
    return scaled * np.float32(factor) + np.float32(offset) if input_scale != "raw" else scaled


def fit_to_input(data: Dataset, height: int | None, width: int | None, channels: int,
                 input_scale: str) -> Dataset:
    """Returns the dataset resized and converted to a model's input (channels 1 or 3), scaled.

    Raw-pixel data stay uint8 (every consumer casts); other scales become float32 once
    here, so training, evaluation and int8 calibration all see the model's convention.
    """
    def fit(x: np.ndarray) -> np.ndarray:
        if len(x) and height and width and x.shape[1:3] != (height, width):
            x = resize(x, (height, width))
        if channels == 1:  # ITU-R 601 luma, as PIL's "L" conversion
            x = np.round(x.astype(np.float32) @ np.float32([0.299, 0.587, 0.114]))
            x = x.clip(0, 255).astype(np.uint8)[..., None]
        return x if input_scale == "raw" else scale_images(x, input_scale)

    arrays = {name: fit(getattr(data, name)) for name in ("x_train", "x_val", "x_test")}
    digest = hashlib.sha256(
        f"{data.fingerprint}|{height}x{width}x{channels}|{input_scale}".encode()).hexdigest()[:16]
    return dataclasses.replace(data, **arrays, fingerprint=digest)


# ------------------------------------------------------------------------ .npz arrays
def read_npz(path: Path, classes: list[str] | None) -> tuple[tuple[np.ndarray, ...], list[str]]:
    """Returns ((x_train, y_train, x_test, y_test), class names) checked from one .npz file."""
    if not zipfile.is_zipfile(path):
        raise DataError(f"data.path: {path} is not a .npz file (a zip of .npy arrays)")
    try:
        with np.load(path, allow_pickle=False) as stored:
            missing = [name for name in NPZ_ARRAYS if name not in stored.files]
            if missing:
                raise DataError(f"data.path: {path} has no array {missing[0]} "
                                f"(a .npz needs {', '.join(NPZ_ARRAYS)})")
            raw = {name: _npz_array(stored, name, path) for name in NPZ_ARRAYS}
    except (OSError, ValueError, EOFError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"data.path: {path} is not a readable .npz file ({error})") from None
    images = [_npz_images(raw[name], name, path) for name in ("x_train", "x_test")]
    if images[0].shape[1:] != images[1].shape[1:]:
        raise DataError(f"data.path: {path}: x_test images are {images[1].shape[1:]}, "
                        f"x_train images {images[0].shape[1:]}")
    pixels = _npz_pixels(images, path)
    labels = [_npz_labels(raw[y], y, len(x), x_name, path)
              for y, x, x_name in (("y_train", pixels[0], "x_train"),
                                   ("y_test", pixels[1], "x_test"))]
    count = len(classes) if classes else int(max(y.max() for y in labels)) + 1
    for name, y in zip(("y_train", "y_test"), labels):
        if y.min() < 0 or y.max() >= count:
            bad = int(y.min() if y.min() < 0 else y.max())
            where = f"the {count} names in data.classes" if classes else "labels 0..n-1"
            raise DataError(f"data.path: {path}: {name} has label {bad}, out of range for {where}")
    names = list(classes) if classes else [str(i) for i in range(count)]
    return (pixels[0], labels[0], pixels[1], labels[1]), names


def _npz_array(stored, name: str, path: Path) -> np.ndarray:
    try:
        return stored[name]
    except ValueError as error:  # object arrays need pickle, which is refused
        raise DataError(f"data.path: {path}: {name} cannot be read ({error})") from None


def _npz_images(x: np.ndarray, name: str, path: Path) -> np.ndarray:
    """Returns NHWC images from NHW or NHWC (C 1 or 3), or raises naming the array."""
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(f"data.path: {path}: {name} has shape {x.shape}; images are "
                        "N x H x W or N x H x W x C with C 1 or 3")
    if not len(x):
        raise DataError(f"data.path: {path}: {name} is empty")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DataError(f"data.path: {path}: {name} has dtype {x.dtype}, not numbers")
    return x


def _npz_pixels(images: list[np.ndarray], path: Path) -> list[np.ndarray]:
    """Returns uint8 RGB pixels; floats in 0..1 are scaled by 255, floats in 0..255 kept."""
    if all(x.dtype == np.uint8 for x in images):
        return [np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x for x in images]
    low = min(float(np.min(x)) for x in images)
    high = max(float(np.max(x)) for x in images)
    for name, x in zip(("x_train", "x_test"), images):
        if not np.all(np.isfinite(x)) or np.min(x) < 0 or np.max(x) > 255:
            raise DataError(f"data.path: {path}: {name} has values outside 0..255 (min "
                            f"{np.min(x)}, max {np.max(x)}); store pixels 0..255 or 0..1 and set "
                            "model.input_scale for what the model expects")
    factor = 255.0 if high <= 1.0 and low >= 0 else 1.0
    out = [np.round(x.astype(np.float32) * factor).clip(0, 255).astype(np.uint8) for x in images]
    return [np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x for x in out]


def _npz_labels(y: np.ndarray, name: str, n_images: int, x_name: str, path: Path) -> np.ndarray:
    """Returns integer labels as int64, or raises naming the array."""
    y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
    if y.ndim != 1:
        raise DataError(f"data.path: {path}: {name} has shape {y.shape}; labels are one "
                        "integer per image")
    if len(y) != n_images:
        raise DataError(f"data.path: {path}: {name} has {len(y)} labels for {n_images} "
                        f"images in {x_name}")
    if not np.issubdtype(y.dtype, np.integer):
        if not (np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0)):
            raise DataError(f"data.path: {path}: {name} holds {y.dtype} values, not integer "
                            "class labels")
    return y.astype(np.int64)


def in_class_order(arrays: tuple[np.ndarray, ...], found: list[str], wanted: list[str],
                   path: str | None) -> tuple[tuple[np.ndarray, ...], list[str]]:
    """Returns the arrays relabelled so label i is wanted[i] (data.classes gives the order)."""
    if set(found) != set(wanted):
        extra, missing = sorted(set(found) - set(wanted)), sorted(set(wanted) - set(found))
        detail = f"folder {extra[0]!r} is not named in it" if extra \
            else f"{missing[0]!r} has no folder in {path}"
        raise DataError(f"data.classes: {detail}")
    lookup = np.array([wanted.index(name) for name in found], dtype=np.int64)
    x_train, y_train, x_test, y_test = arrays
    return (x_train, lookup[y_train], x_test, lookup[y_test]), list(wanted)


def _keras_cifar10() -> tuple[np.ndarray, ...]:
    """Returns CIFAR-10 through the normal Keras download (cached by Keras in ~/.keras)."""
    from src.keras_env import keras

    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    except Exception as error:  # noqa: BLE001 - any download failure means the same to the user
        raise DataError(
            "data.path: CIFAR-10 download failed "
            f"({type(error).__name__}); set data.path to a local copy"
        ) from None
    return x_train, y_train.ravel().astype(np.int64), x_test, y_test.ravel().astype(np.int64)


# ---------------------------------------------------------------------- local sources
def fingerprint_source(path: Path) -> str:
    """Returns a content fingerprint: sha256 of a file, or of a directory's listing and sizes."""
    if not path.exists():
        raise DataError(f"data.path: {path} does not exist")
    digest = hashlib.sha256()
    if path.is_file():
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    else:
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            stat = file.stat()
            digest.update(f"{file.relative_to(path)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _cached_local(path: Path, image_size: int, cache_dir: Path):
    """Returns (arrays, class names, source id) from a local path, decoding at most once."""
    source = f"{fingerprint_source(path)}-{image_size}"
    cache_file = cache_dir / "datasets" / f"{source}.npz"
    if cache_file.exists():
        try:
            with np.load(cache_file, allow_pickle=False) as cached:
                arrays = tuple(cached[k] for k in ("x_train", "y_train", "x_test", "y_test"))
                return arrays, [str(c) for c in cached["class_names"]], source
        except (OSError, ValueError, KeyError):
            cache_file.unlink(missing_ok=True)  # corrupt cache entry: decode again
    arrays, classes = read_local(path, image_size)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, x_train=arrays[0], y_train=arrays[1], x_test=arrays[2], y_test=arrays[3],
             class_names=np.array(classes))
    tmp.replace(cache_file)
    return arrays, classes, source


def read_local(path: Path, image_size: int) -> tuple[tuple[np.ndarray, ...], list[str]]:
    """Returns ((x_train, y_train, x_test, y_test), class names) decoded from a file or folder."""
    if path.is_dir():
        batches = path if (path / "data_batch_1").exists() else path / "cifar-10-batches-py"
        if (batches / "data_batch_1").exists():
            return _cifar_batches({p.name: p.read_bytes() for p in batches.iterdir()}, path)
        folders = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_dir()}
        return _image_folder(_folder_files(path), folders, path, image_size)
    try:
        with tarfile.open(path) as archive:
            files, folders = _tar_files(archive, path)
    except (tarfile.TarError, OSError, EOFError) as error:
        raise DataError(f"data.path: {path} is not a readable tar archive ({error})") from None
    names = {PurePosixPath(name).name for name in files}
    if "data_batch_1" in names:
        return _cifar_batches({PurePosixPath(k).name: v for k, v in files.items()}, path)
    return _image_folder(files, folders, path, image_size)


def _tar_files(archive: tarfile.TarFile, path: Path) -> tuple[dict[str, bytes], set[str]]:
    """Returns {name: bytes} of the regular files and the folder names; unsafe members raise."""
    dest = str(path.parent / "_extract")
    files: dict[str, bytes] = {}
    folders: set[str] = set()
    for member in archive:
        try:
            if PurePosixPath(member.name).is_absolute():  # data_filter would only strip the "/"
                raise tarfile.AbsolutePathError(member)
            member = tarfile.data_filter(member, dest)
        except tarfile.FilterError as error:
            raise DataError(f"data.path: {path} has an unsafe member refused: {error}") from None
        if member.isdir():
            folders.add(member.name.rstrip("/"))
        elif member.isfile():
            handle = archive.extractfile(member)
            if handle is not None:
                files[member.name] = handle.read()
    return files, folders


def _folder_files(path: Path) -> dict[str, bytes]:
    """Returns {relative name: bytes} for every file under a directory."""
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def _split_parts(name: str) -> tuple[str, str] | None:
    """Returns (split, class) for '.../train/<class>/<file>', else None."""
    parts = PurePosixPath(name).parts
    if len(parts) >= 3 and parts[-3] in ("train", "test"):
        return parts[-3], parts[-2]
    return None


def _image_folder(files: dict[str, bytes], folders: set[str], path: Path, image_size: int):
    """Returns arrays and class names from train/<class>/* and test/<class>/* files."""
    layout: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    for folder in folders:  # class folders count even when empty, so they can be named
        found = _split_parts(f"{folder}/file")
        if found:
            layout[found[0]].setdefault(found[1], [])
    for name in sorted(files):
        found = _split_parts(name)
        if found and not PurePosixPath(name).name.startswith("."):
            layout[found[0]].setdefault(found[1], []).append(name)
    if not layout["train"]:
        raise DataError(f"data.path: {path} has no train/<class>/ images")
    if not layout["test"]:
        raise DataError(f"data.path: {path} has no test/<class>/ images")
    classes = sorted(set(layout["train"]) | set(layout["test"]))
    for split, by_class in layout.items():
        for cls in classes:
            images = [n for n in by_class.get(cls, []) if PurePosixPath(n).suffix.lower()
                      in IMAGE_SUFFIXES]
            if not images:
                raise DataError(f"data.path: {path}: class folder {split}/{cls} has no images")
            by_class[cls] = images
    arrays = []
    for split in ("train", "test"):
        names = [(n, label) for label, cls in enumerate(classes) for n in layout[split][cls]]
        arrays.append(np.stack([_decode(files[n], n, path, image_size) for n, _ in names]))
        arrays.append(np.array([label for _, label in names], dtype=np.int64))
    return tuple(arrays), classes


def _decode(data: bytes, name: str, path: Path, image_size: int) -> np.ndarray:
    """Returns one image as uint8 HxWx3 at image_size, or raises DataError naming it."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.BILINEAR)
            return np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(f"data.path: {path}: cannot decode {name} ({error})") from None


def _cifar_batches(files: dict[str, bytes], path: Path):
    """Returns arrays from the official python-pickle CIFAR-10 batches."""
    def read(name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in files:
            raise DataError(f"data.path: {path} lacks {name}")
        try:
            batch = pickle.loads(files[name], encoding="bytes")  # noqa: S301 - official format
            x = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            return x.transpose(0, 2, 3, 1), np.asarray(batch[b"labels"], dtype=np.int64)
        except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as error:
            raise DataError(f"data.path: {path}: corrupt batch {name} ({error})") from None

    train = [read(f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = read("test_batch")
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return (x_train, y_train, x_test, y_test), list(CIFAR10_CLASSES)
