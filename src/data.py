"""Datasets as uint8 arrays: CIFAR-10 (local or Keras download), image folders, synthetic.

Every loader returns a ``Dataset`` with train / validation / test splits.  Decoding
an archive is slow, so decoded arrays are cached by the source's fingerprint.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from src.config import DataConfig

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)


class DataError(ValueError):
    """A dataset that cannot be read; the message names the file."""


@dataclass
class Dataset:
    """Image splits as uint8 NHWC arrays with integer labels."""

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
    elif cfg.path:
        arrays, classes, source = _cached_local(Path(cfg.path).expanduser(), cfg.image_size,
                                                Path(cache_dir))
    elif cfg.name == "cifar10":
        arrays, classes, source = _keras_cifar10(), list(CIFAR10_CLASSES), "keras:cifar10"
    else:
        raise DataError(f"data.path: {cfg.name} needs a path")
    x_train, y_train, x_test, y_test = arrays
    if x_train.shape[1] != cfg.image_size:
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


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """Returns the images resized to size x size (bilinear)."""
    return np.stack([
        np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR)) for img in images
    ])


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
