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


# ------------------------------------------------------------------------ .npz arrays
def write_npz(path: Path, **change) -> Path:
    """Writes a small valid .npz (4 classes), with arrays replaced or dropped (None)."""
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8),
              "y_train": np.arange(12) % 4,
              "x_test": rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8),
              "y_test": np.arange(6) % 4}
    arrays.update(change)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def npz_cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(name="npz", path=str(path), image_size=kw.pop("image_size", 8),
                      val_fraction=kw.pop("val_fraction", 0.0), **kw)


def test_npz_arrays_load_as_they_are(tmp_path):
    path = write_npz(tmp_path / "mine.npz")
    ds = data.load(npz_cfg(path, classes=["a", "b", "c", "d"]), tmp_path)
    with np.load(path) as stored:
        assert np.array_equal(ds.x_train, stored["x_train"])
        assert np.array_equal(ds.y_test, stored["y_test"])
    assert ds.class_names == ["a", "b", "c", "d"] and ds.x_train.dtype == np.uint8
    unnamed = data.load(npz_cfg(path), tmp_path)
    assert unnamed.class_names == ["0", "1", "2", "3"]
    assert data.load(npz_cfg(path, image_size=16), tmp_path).x_test.shape == (6, 16, 16, 3)


def test_npz_float_and_grey_images_become_rgb_pixels(tmp_path):
    grey = np.linspace(0, 1, 12 * 64, dtype=np.float32).reshape(12, 8, 8)
    path = write_npz(tmp_path / "grey.npz", x_train=grey, x_test=grey[:6],
                     y_train=(np.arange(12) % 4).reshape(-1, 1).astype(np.float32))
    ds = data.load(npz_cfg(path), tmp_path)
    assert ds.x_train.shape == (12, 8, 8, 3) and ds.x_train.dtype == np.uint8
    assert ds.x_train[-1, -1, -1].tolist() == [255, 255, 255]  # 0..1 floats scaled to pixels
    assert ds.y_train.dtype == np.int64 and ds.y_train.tolist() == (np.arange(12) % 4).tolist()


@pytest.mark.parametrize("change,expected", [
    ({"x_test": None}, r"has no array x_test \(a \.npz needs x_train, y_train, x_test, y_test\)"),
    ({"y_train": None}, r"has no array y_train"),
    ({"y_test": np.array([0, 1, 2, 3, 4, 0])}, r"y_test has label 4, out of range for the 4 "
                                               r"names in data.classes"),
    ({"y_train": np.arange(12) % 4 - 1}, r"y_train has label -1, out of range"),
    ({"y_train": np.arange(11) % 4}, r"y_train has 11 labels for 12 images in x_train"),
    ({"x_test": np.zeros((0, 8, 8, 3), np.uint8), "y_test": np.zeros(0, int)},
     r"x_test is empty"),
    ({"x_train": np.zeros((12, 8, 8, 5), np.uint8)}, r"x_train has shape \(12, 8, 8, 5\)"),
    ({"x_test": np.full((6, 8, 8, 3), -1.0)}, r"x_test has values outside 0\.\.255"),
    ({"y_train": np.full(12, 0.5)}, r"y_train holds float64 values, not integer class labels"),
], ids=["no-x_test", "no-y_train", "label-high", "label-negative", "count", "empty",
        "channels", "negative-pixels", "float-labels"])
def test_bad_npz_fails_naming_the_array(tmp_path, change, expected):
    path = write_npz(tmp_path / "bad.npz", **change)
    with pytest.raises(DataError, match=r"^data\.path: .*bad\.npz:? " + expected) as error:
        data.load(npz_cfg(path, classes=["a", "b", "c", "d"]), tmp_path)
    assert "\n" not in str(error.value)


def test_a_file_that_is_not_npz(tmp_path):
    (tmp_path / "x.npz").write_text("hello")
    with pytest.raises(DataError, match=r"^data\.path: .*x\.npz is not a \.npz file"):
        data.load(npz_cfg(tmp_path / "x.npz"), tmp_path)


def test_data_classes_give_the_label_order(tmp_path):
    folder = write_image_folder(tmp_path / "pets", classes=("cat", "dog"))
    ds = data.load(cfg(folder, name="image_folder", val_fraction=0.0, classes=["dog", "cat"]),
                   tmp_path / "cache")
    assert ds.class_names == ["dog", "cat"]
    # dog images (value 40 + i) now carry label 0
    assert set(ds.y_test[ds.x_test[:, 0, 0, 0] >= 40].tolist()) == {0}
    with pytest.raises(DataError, match=r"^data\.classes: folder 'dog' is not named in it"):
        data.load(cfg(folder, name="image_folder", classes=["cat", "bird"]), tmp_path / "cache")


def test_fit_to_input_resizes_converts_and_scales(tmp_path):
    ds = data.load(DataConfig(name="synthetic", n_train=20, n_test=8, num_classes=2,
                              image_size=16), tmp_path)
    grey = data.fit_to_input(ds, 12, 20, 1, "symmetric")
    assert grey.x_train.shape == (len(ds.x_train), 12, 20, 1) and grey.x_test.dtype == np.float32
    assert -1.0 <= grey.x_test.min() and grey.x_test.max() <= 1.0
    assert grey.fingerprint != ds.fingerprint and np.array_equal(grey.y_test, ds.y_test)
    raw = data.fit_to_input(ds, 16, 16, 3, "raw")
    assert raw.x_test is ds.x_test or np.array_equal(raw.x_test, ds.x_test)
    assert data.scale_images(np.array([0, 255], np.uint8), "unit").tolist() == [0.0, 1.0]
    assert data.scale_images(np.array([0, 255], np.uint8), "symmetric").tolist() == [-1.0, 1.0]
