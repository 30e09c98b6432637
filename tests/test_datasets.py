"""Built-in offline data: photo crops from packaged photographs and the split digits set."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit import datasets
from edgekit.data import Dataset
from edgekit.datasets import (
    CALIBRATION_SOURCES,
    EVALUATION_SOURCES,
    builtin_dataset,
    digits,
    digits_split_indices,
    photos,
)
from edgekit.errors import ConfigError, DataError
from edgekit.iospec import Preprocessing, TensorSpec

N_DIGITS = 1797


# --- photos ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["calibration", "evaluation"])
def test_photos_shape_dtype_range(split):
    x = photos(split, 5, size=48)
    assert x.shape == (5, 48, 48, 3)
    assert x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert x.std() > 0.01  # real pictures, not a constant fill
    assert np.isfinite(x).all()


def test_photos_deterministic():
    a = photos("evaluation", 4, size=32, seed=7)
    b = photos("evaluation", 4, size=32, seed=7)
    assert np.array_equal(a, b)


def test_photos_different_seeds_differ():
    a = photos("calibration", 4, size=32, seed=0)
    b = photos("calibration", 4, size=32, seed=1)
    assert not np.array_equal(a, b)
    for i in range(4):  # every crop differs, not just some
        assert not np.array_equal(a[i], b[i])


def test_photos_prefix_is_stable():
    small = photos("evaluation", 3, size=24, seed=2)
    big = photos("evaluation", 8, size=24, seed=2)
    assert np.array_equal(small, big[:3])


def test_photo_splits_are_disjoint_and_nonempty():
    assert CALIBRATION_SOURCES and EVALUATION_SOURCES
    assert len(set(CALIBRATION_SOURCES)) == len(CALIBRATION_SOURCES)
    assert len(set(EVALUATION_SOURCES)) == len(EVALUATION_SOURCES)
    assert not set(CALIBRATION_SOURCES) & set(EVALUATION_SOURCES)


@pytest.mark.parametrize("name", CALIBRATION_SOURCES + EVALUATION_SOURCES)
def test_every_source_loads_offline_as_rgb(name):
    img = datasets.load_source(name)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert min(img.shape[:2]) >= 100


def test_splits_use_their_own_sources(monkeypatch):
    seen: list[str] = []
    real = datasets.load_source

    def spy(name):
        seen.append(name)
        return real(name)

    monkeypatch.setattr(datasets, "load_source", spy)
    photos("evaluation", len(EVALUATION_SOURCES) * 2, size=16)
    assert set(seen) == set(EVALUATION_SOURCES)  # round-robin reaches every source, and no other
    seen.clear()
    photos("calibration", len(CALIBRATION_SOURCES), size=16)
    assert set(seen) == set(CALIBRATION_SOURCES)


def test_missing_source_raises_data_error_naming_it(monkeypatch):
    monkeypatch.setitem(datasets._SOURCES, "ghost_photo", ("skimage", "data/ghost_photo.png"))
    with pytest.raises(DataError, match="ghost_photo"):
        datasets.load_source("ghost_photo")


def test_photos_rejects_unknown_split():
    with pytest.raises(ConfigError, match="calibration"):
        photos("train", 2)


# --- digits ---------------------------------------------------------------------------------------


def test_digits_split_indices_partition_everything():
    idx = digits_split_indices(0)
    assert set(idx) == {"train", "calibration", "evaluation"}
    sizes = {k: len(v) for k, v in idx.items()}
    assert sum(sizes.values()) == N_DIGITS
    everything = np.concatenate(list(idx.values()))
    assert len(np.unique(everything)) == N_DIGITS  # disjoint and covering
    assert set(everything.tolist()) == set(range(N_DIGITS))
    assert abs(sizes["train"] / N_DIGITS - 0.60) < 0.01
    assert abs(sizes["calibration"] / N_DIGITS - 0.15) < 0.01
    assert abs(sizes["evaluation"] / N_DIGITS - 0.25) < 0.01


def test_digits_split_is_seeded():
    a, b, c = digits_split_indices(0), digits_split_indices(0), digits_split_indices(1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["evaluation"], c["evaluation"])


@pytest.mark.parametrize("split", ["train", "calibration", "evaluation"])
def test_digits_split_contents(split):
    images, labels = digits(split)
    n = len(digits_split_indices(0)[split])
    assert images.shape == (n, 8, 8, 1) and images.dtype == np.float32
    assert labels.shape == (n,) and labels.dtype == np.int64
    assert images.min() >= 0.0 and images.max() <= 1.0 and images.max() > 0.9
    assert set(labels.tolist()) == set(range(10))


def test_digits_matches_sklearn_by_index():
    from sklearn.datasets import load_digits

    ref = load_digits()
    images, labels = digits("calibration", seed=0)
    idx = digits_split_indices(0)["calibration"]
    assert np.array_equal(labels, ref.target[idx])
    assert np.allclose(images[..., 0], ref.images[idx] / 16.0)


def test_digits_rejects_unknown_split():
    with pytest.raises(ConfigError):
        digits("test")


# --- builtin_dataset --------------------------------------------------------------------------------


def test_builtin_photos_nchw_normalised():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    prep = Preprocessing(size=(32, 32), mean=mean, std=std, layout="NCHW")
    spec = TensorSpec("input", ("N", 3, 32, 32))
    ds = builtin_dataset("photos", "calibration", [spec], prep, n=4, seed=3)
    assert isinstance(ds, Dataset) and len(ds) == 4 and ds.labels is None
    x = ds.inputs["input"]
    assert x.shape == (4, 3, 32, 32) and x.dtype == np.float32
    raw = photos("calibration", 4, size=32, seed=3)
    i, c, h, w = 2, 1, 5, 17
    assert x[i, c, h, w] == pytest.approx((raw[i, h, w, c] - mean[c]) / std[c], abs=1e-6)
    manual = (raw - np.array(mean, np.float32)) / np.array(std, np.float32)
    assert np.allclose(x, manual.transpose(0, 3, 1, 2), atol=1e-6)


def test_builtin_photos_default_counts():
    prep = Preprocessing(size=(16, 16))
    spec = TensorSpec("x", ("N", 3, 16, 16))
    assert len(builtin_dataset("photos", "calibration", [spec], prep)) == 64
    assert len(builtin_dataset("photos", "evaluation", [spec], prep)) == 128


def test_builtin_digits_with_labels_and_preprocessing():
    prep = Preprocessing(size=(8, 8), mean=(0.5,), std=(0.25,), channels=1, layout="NCHW")
    spec = TensorSpec("pixels", ("N", 1, 8, 8))
    ds = builtin_dataset("digits", "evaluation", [spec], prep)
    images, labels = digits("evaluation")
    x = ds.inputs["pixels"]
    assert x.shape == (len(images), 1, 8, 8)
    assert np.array_equal(ds.labels, labels)
    assert x[3, 0, 4, 2] == pytest.approx((images[3, 4, 2, 0] - 0.5) / 0.25)
    assert np.allclose(x, ((images - 0.5) / 0.25).transpose(0, 3, 1, 2))


def test_builtin_digits_roles_and_n():
    prep = Preprocessing(size=(8, 8), mean=(0.0,), std=(1.0,), channels=1)
    spec = TensorSpec("x", ("N", 1, 8, 8))
    train = builtin_dataset("digits", "train", [spec], prep)
    assert len(train) == len(digits_split_indices(0)["train"])
    cal = builtin_dataset("digits", "calibration", [spec], prep, n=10)
    assert len(cal) == 10 and cal.labels.shape == (10,)


def test_builtin_digits_resized_rgb_nhwc():
    prep = Preprocessing(size=(16, 16), layout="NHWC")
    spec = TensorSpec("x", (1, 16, 16, 3))
    ds = builtin_dataset("digits", "calibration", [spec], prep, n=5)
    x = ds.inputs["x"]
    assert x.shape == (5, 16, 16, 3)
    assert np.array_equal(x[..., 0], x[..., 2])  # grayscale stacked
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_builtin_unknown_name_lists_known():
    prep = Preprocessing(size=(8, 8))
    with pytest.raises(ConfigError, match="photos.*digits|digits.*photos"):
        builtin_dataset("imagenet", "calibration", [TensorSpec("x", ("N", 3, 8, 8))], prep)


def test_builtin_photos_has_no_train_split():
    prep = Preprocessing(size=(8, 8))
    with pytest.raises(ConfigError, match="train"):
        builtin_dataset("photos", "train", [TensorSpec("x", ("N", 3, 8, 8))], prep)


def test_builtin_shape_mismatch_is_data_error():
    prep = Preprocessing(size=(8, 8))
    with pytest.raises(DataError, match="builtin:photos"):
        builtin_dataset("photos", "calibration", [TensorSpec("x", ("N", 3, 16, 16))], prep, n=2)


def test_builtin_multi_input_rejected():
    prep = Preprocessing(size=(8, 8))
    specs = [TensorSpec("a", ("N", 3, 8, 8)), TensorSpec("b", ("N", 3, 8, 8))]
    with pytest.raises(ConfigError, match="single"):
        builtin_dataset("photos", "calibration", specs, prep, n=2)
