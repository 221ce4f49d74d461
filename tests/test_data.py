"""Dataset loaders: every supported source, the decode cache, and refused bad input."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from src import data
from src.config import DataConfig
from src.data import DataError


def write_image_folder(root: Path, classes=("cat", "dog"), per_class=4, size=12) -> Path:
    """Writes train/<class>/*.png and test/<class>/*.png with class-coloured images."""
    for split in ("train", "test"):
        for label, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = np.full((size, size, 3), 40 * label + i, dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def write_tar(source: Path, target: Path) -> Path:
    with tarfile.open(target, "w:gz") as archive:
        archive.add(source, arcname=source.name)
    return target


def write_official_cifar(target: Path, per_batch=6) -> Path:
    """Writes a tiny archive in the official cifar-10-python.tar.gz layout."""
    rng = np.random.default_rng(0)
    with tarfile.open(target, "w:gz") as archive:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            batch = {b"data": rng.integers(0, 255, (per_batch, 3072), dtype=np.uint8),
                     b"labels": list(rng.integers(0, 10, per_batch))}
            payload = pickle.dumps(batch)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return target


def cfg(path, **kw) -> DataConfig:
    return DataConfig(name=kw.pop("name", "cifar10"), path=str(path) if path else None,
                      image_size=kw.pop("image_size", 32), **kw)


def test_synthetic_splits_and_is_deterministic(tmp_path):
    c = DataConfig(name="synthetic", n_train=100, n_test=20, num_classes=4, val_fraction=0.2)
    a, b = data.load(c, tmp_path), data.load(c, tmp_path)
    assert a.x_train.shape == (80, 32, 32, 3) and a.x_val.shape == (20, 32, 32, 3)
    assert a.x_test.shape == (20, 32, 32, 3) and a.x_train.dtype == np.uint8
    assert np.bincount(a.y_val).tolist() == [5, 5, 5, 5]  # stratified
    assert np.array_equal(a.x_train, b.x_train) and a.fingerprint == b.fingerprint


def test_validation_split_leaves_every_class_in_training():
    y = np.array([0] * 10 + [1])
    (x_train, y_train), (_, y_val) = data.split_validation(np.zeros((11, 2)), y, 0.6)
    assert set(y_train.tolist()) == {0, 1} and len(y_val) == 6


def test_official_cifar_archive_and_extracted_folder(tmp_path):
    archive = write_official_cifar(tmp_path / "cifar-10-python.tar.gz")
    from_tar = data.load(cfg(archive, val_fraction=0.0), tmp_path / "cache")
    assert from_tar.x_train.shape == (30, 32, 32, 3) and from_tar.x_test.shape == (6, 32, 32, 3)
    assert from_tar.class_names[0] == "airplane"
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    from_dir = data.load(cfg(tmp_path / "extracted" / "cifar-10-batches-py", val_fraction=0.0),
                         tmp_path / "cache")
    assert np.array_equal(from_tar.x_train, from_dir.x_train)


def test_image_folder_dir_and_archive_resized_to_model_input(tmp_path):
    folder = write_image_folder(tmp_path / "pets")
    archive = write_tar(folder, tmp_path / "pets.tar.gz")
    for source in (folder, archive):
        ds = data.load(cfg(source, name="image_folder", image_size=16, val_fraction=0.0),
                       tmp_path / "cache")
        assert ds.class_names == ["cat", "dog"]
        assert ds.x_train.shape == (8, 16, 16, 3) and ds.x_test.shape == (8, 16, 16, 3)
        assert sorted(ds.y_train.tolist()) == [0] * 4 + [1] * 4


def test_decoded_arrays_are_cached(tmp_path, monkeypatch):
    archive = write_tar(write_image_folder(tmp_path / "pets"), tmp_path / "pets.tar")
    first = data.load(cfg(archive, name="image_folder"), tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "datasets").glob("*.npz"))) == 1

    def no_decoding(*_):
        raise AssertionError("decoded again")

    monkeypatch.setattr(data, "read_local", no_decoding)
    second = data.load(cfg(archive, name="image_folder"), tmp_path / "cache")
    assert np.array_equal(first.x_train, second.x_train)


def test_no_path_uses_the_keras_download(tmp_path, monkeypatch):
    from src.keras_env import keras

    fake = ((np.zeros((20, 32, 32, 3), np.uint8), np.arange(20).reshape(-1, 1) % 10),
            (np.zeros((10, 32, 32, 3), np.uint8), np.arange(10).reshape(-1, 1)))
    monkeypatch.setattr(keras.datasets.cifar10, "load_data", lambda: fake)
    ds = data.load(cfg(None, val_fraction=0.0), tmp_path)
    assert ds.x_train.shape == (20, 32, 32, 3) and ds.y_test.tolist() == list(range(10))


def test_failed_download_says_to_set_a_path(tmp_path, monkeypatch):
    from src.keras_env import keras

    def offline():
        raise OSError("no network")

    monkeypatch.setattr(keras.datasets.cifar10, "load_data", offline)
    with pytest.raises(DataError, match=r"^data\.path: CIFAR-10 download failed"):
        data.load(cfg(None), tmp_path)


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match=r"^data\.path: .*nope.tar.gz does not exist"):
        data.load(cfg(tmp_path / "nope.tar.gz"), tmp_path)


def test_corrupt_archive(tmp_path):
    archive = write_tar(write_image_folder(tmp_path / "pets"), tmp_path / "pets.tar.gz")
    archive.write_bytes(archive.read_bytes()[:200])
    with pytest.raises(DataError, match=r"^data\.path: .*pets.tar.gz is not a readable"):
        data.load(cfg(archive, name="image_folder"), tmp_path)


def test_corrupt_image_is_named(tmp_path):
    folder = write_image_folder(tmp_path / "pets")
    (folder / "train" / "cat" / "0.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"cannot decode train/cat/0.png"):
        data.load(cfg(folder, name="image_folder"), tmp_path)


def test_empty_class_folder_is_named(tmp_path):
    folder = write_image_folder(tmp_path / "pets")
    for image in (folder / "test" / "dog").iterdir():
        image.unlink()
    (folder / "test" / "dog" / "README.txt").write_text("nothing here")
    with pytest.raises(DataError, match=r"class folder test/dog has no images"):
        data.load(cfg(folder, name="image_folder"), tmp_path)


@pytest.mark.parametrize("member", ["../evil.png", "/abs/evil.png", "link", "device"])
def test_archive_members_landing_outside_are_refused(tmp_path, member):
    archive = tmp_path / "bad.tar"
    folder = write_image_folder(tmp_path / "pets")
    with tarfile.open(archive, "w") as tar:
        tar.add(folder, arcname="pets")
        info = tarfile.TarInfo(member)
        if member == "link":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        elif member == "device":
            info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            tar.addfile(info)
        else:
            info.size = 3
            tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(DataError, match=r"^data\.path: .*bad.tar has an unsafe member refused"):
        data.load(cfg(archive, name="image_folder"), tmp_path)


def test_limits_take_a_subset_of_every_class(tmp_path):
    folder = write_image_folder(tmp_path / "pets", classes=("a", "b", "c"), per_class=10)
    ds = data.load(cfg(folder, name="image_folder", val_fraction=0.0, limit_train=12,
                       limit_test=9), tmp_path / "cache")
    assert len(ds.y_train) == 12 and len(ds.y_test) == 9
    assert set(ds.y_train.tolist()) == {0, 1, 2}  # not the first 12 files of a sorted folder
