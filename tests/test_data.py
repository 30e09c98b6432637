"""User data readers: every bad input is a DataError naming the file; good inputs load in the model's layout."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from edgekit.data import Dataset, load_data
from edgekit.errors import ConfigError, DataError
from edgekit.iospec import Preprocessing, TensorSpec

SPEC = TensorSpec("input", ("N", 3, 8, 8))
PREP = Preprocessing(size=(8, 8), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), layout="NCHW")


def _good(n=4, seed=0):
    return np.random.default_rng(seed).random((n, 3, 8, 8), dtype=np.float32)


def _save_png(path, rgb, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb, mode=mode).save(path)


# --- bad inputs ---------------------------------------------------------------------------------------


def _expect_data_error(path, *match, inputs=(SPEC,), prep=None):
    with pytest.raises(DataError) as info:
        load_data(path, list(inputs), prep)
    msg = str(info.value)
    assert str(path) in msg, msg
    for m in match:
        assert m in msg, msg
    return msg


def test_npy_with_nan(tmp_path):
    x = _good()
    x[1, 2, 3, 4] = np.nan
    x[2, 0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", x)
    _expect_data_error(tmp_path / "nan.npy", "'input'", "2 NaN")


def test_npy_with_inf(tmp_path):
    x = _good()
    x[0, 0, 0, 0] = -np.inf
    np.save(tmp_path / "inf.npy", x)
    _expect_data_error(tmp_path / "inf.npy", "'input'", "1 NaN or Inf")


def test_npy_wrong_shape_names_expected_and_got(tmp_path):
    np.save(tmp_path / "shape.npy", np.zeros((4, 3, 16, 16), np.float32))
    msg = _expect_data_error(tmp_path / "shape.npy", "'input'", "(3, 8, 8)", "(3, 16, 16)", "hint")
    assert "expects (3, 8, 8) per sample" in msg


def test_npy_channels_last_gets_transpose_hint(tmp_path):
    np.save(tmp_path / "nhwc.npy", np.zeros((4, 8, 8, 3), np.float32))
    msg = _expect_data_error(tmp_path / "nhwc.npy", "(8, 8, 3)")
    assert "transpose(0, 3, 1, 2)" in msg


def test_npy_string_dtype(tmp_path):
    np.save(tmp_path / "str.npy", np.full((2, 3, 8, 8), "a"))
    _expect_data_error(tmp_path / "str.npy", "dtype")


@pytest.mark.parametrize("dtype", [bool, np.complex64])
def test_npy_bool_and_complex_rejected(tmp_path, dtype):
    np.save(tmp_path / "odd.npy", np.zeros((2, 3, 8, 8), dtype))
    _expect_data_error(tmp_path / "odd.npy", "dtype")


def test_npy_object_dtype_rejected(tmp_path):
    arr = np.empty(2, dtype=object)
    arr[:] = [1, "x"]
    np.save(tmp_path / "obj.npy", arr, allow_pickle=True)
    _expect_data_error(tmp_path / "obj.npy", "objects")


def test_npy_empty(tmp_path):
    np.save(tmp_path / "empty.npy", np.zeros((0, 3, 8, 8), np.float32))
    _expect_data_error(tmp_path / "empty.npy", "empty")


def test_missing_file(tmp_path):
    _expect_data_error(tmp_path / "nowhere.npy", "no such file")


def test_missing_folder(tmp_path):
    _expect_data_error(tmp_path / "no_dir", "no such file", prep=PREP)


def test_corrupt_npz(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, input=_good())
    (tmp_path / "corrupt.npz").write_bytes(good.read_bytes()[:60])
    _expect_data_error(tmp_path / "corrupt.npz", "npz")


def test_text_renamed_npy(tmp_path):
    (tmp_path / "notes.npy").write_text("these are not the arrays you are looking for\n")
    _expect_data_error(tmp_path / "notes.npy", "not a .npy")


def test_text_renamed_npz(tmp_path):
    (tmp_path / "notes.npz").write_text("hello")
    _expect_data_error(tmp_path / "notes.npz", ".npz")


def test_npz_missing_key_names_key_and_present(tmp_path):
    specs = [TensorSpec("image", ("N", 3, 8, 8)), TensorSpec("mask", ("N", 8))]
    np.savez(tmp_path / "two.npz", image=_good(), other=np.zeros((4, 8), np.float32))
    msg = _expect_data_error(tmp_path / "two.npz", "'mask'", "image", "other", inputs=specs)
    assert "keys present" in msg


def test_npz_labels_wrong_length(tmp_path):
    np.savez(tmp_path / "lab.npz", input=_good(4), labels=np.arange(3))
    _expect_data_error(tmp_path / "lab.npz", "labels", "(4,)")


def test_npz_labels_not_integer(tmp_path):
    np.savez(tmp_path / "flab.npz", input=_good(4), labels=np.array([0.5, 1, 2, 3]))
    _expect_data_error(tmp_path / "flab.npz", "labels", "integer")


def test_npz_input_with_nan_names_input(tmp_path):
    x = _good()
    x[0, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", input=x)
    _expect_data_error(tmp_path / "nan.npz", "'input'", "1 NaN")


def test_folder_without_preprocessing_is_config_error(tmp_path):
    _save_png(tmp_path / "imgs" / "a.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ConfigError) as info:
        load_data(tmp_path / "imgs", [SPEC], None)
    assert info.value.hint and "preprocessing" in str(info.value)


def test_corrupt_png_in_folder(tmp_path):
    _save_png(tmp_path / "imgs" / "a.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "imgs" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError, match="b.png"):
        load_data(tmp_path / "imgs", [SPEC], PREP)


def test_folder_without_images(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "README.txt").write_text("nothing")
    _expect_data_error(tmp_path / "imgs", "no images", prep=PREP)


def test_unknown_extension_lists_forms(tmp_path):
    (tmp_path / "data.csv").write_text("1,2,3\n")
    _expect_data_error(tmp_path / "data.csv", ".npy", ".npz", "folder", "builtin:")


def test_npy_for_multi_input_model(tmp_path):
    np.save(tmp_path / "x.npy", _good())
    specs = [SPEC, TensorSpec("other", ("N", 2))]
    _expect_data_error(tmp_path / "x.npy", "single-input", inputs=specs)


def test_builtin_without_preprocessing():
    with pytest.raises(ConfigError, match="preprocessing"):
        load_data("builtin:photos", [SPEC])


def test_builtin_unknown_name():
    with pytest.raises(ConfigError, match="photos"):
        load_data("builtin:nope", [SPEC], PREP)


def test_bad_limit_and_role(tmp_path):
    np.save(tmp_path / "x.npy", _good())
    with pytest.raises(ConfigError):
        load_data(tmp_path / "x.npy", [SPEC], limit=0)
    with pytest.raises(ConfigError):
        load_data(tmp_path / "x.npy", [SPEC], role="testing")


# --- good inputs ----------------------------------------------------------------------------------------


def test_npy_single_sample_is_batch_of_one(tmp_path):
    x = _good(1)[0]
    np.save(tmp_path / "one.npy", x)
    ds = load_data(tmp_path / "one.npy", [SPEC])
    assert len(ds) == 1 and ds.inputs["input"].shape == (1, 3, 8, 8)
    assert np.array_equal(ds.inputs["input"][0], x)
    assert ds.source == str(tmp_path / "one.npy") and ds.labels is None


def test_npz_with_labels(tmp_path):
    x = _good(5)
    np.savez(tmp_path / "lab.npz", input=x, labels=np.array([3, 1, 4, 1, 5], np.int32))
    ds = load_data(tmp_path / "lab.npz", [SPEC])
    assert np.array_equal(ds.inputs["input"], x)
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [3, 1, 4, 1, 5]


def test_npz_single_array_other_name(tmp_path):
    np.savez(tmp_path / "anon.npz", _good(3))  # stored as arr_0
    assert len(load_data(tmp_path / "anon.npz", [SPEC])) == 3


def test_npz_multi_input(tmp_path):
    specs = [SPEC, TensorSpec("mask", ("N", 8), "int64")]
    np.savez(tmp_path / "two.npz", input=_good(2), mask=np.ones((2, 8), np.int32))
    ds = load_data(tmp_path / "two.npz", specs)
    assert ds.inputs["mask"].dtype == np.int64 and ds.inputs["input"].dtype == np.float32


def test_int_array_cast_to_float32(tmp_path):
    np.save(tmp_path / "ints.npy", np.arange(2 * 3 * 8 * 8, dtype=np.int64).reshape(2, 3, 8, 8))
    ds = load_data(tmp_path / "ints.npy", [SPEC])
    x = ds.inputs["input"]
    assert x.dtype == np.float32 and x[1, 0, 0, 0] == 192.0


def test_dynamic_dims_accept_any_size(tmp_path):
    spec = TensorSpec("input", ("N", 3, "H", "W"))
    np.save(tmp_path / "dyn.npy", np.zeros((2, 3, 5, 7), np.float32))
    assert load_data(tmp_path / "dyn.npy", [spec]).inputs["input"].shape == (2, 3, 5, 7)
    np.save(tmp_path / "dyn_bad.npy", np.zeros((2, 4, 5, 7), np.float32))
    _expect_data_error(tmp_path / "dyn_bad.npy", "(3, H, W)", inputs=[spec])


def test_image_folder_with_integer_subfolders(tmp_path, caplog):
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for label in (0, 1, 2):
        for k in range(2):
            _save_png(root / str(label) / f"img{k}.PNG", rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    (root / "README.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="edgekit.data"):
        ds = load_data(root, [SPEC], PREP, role="evaluation")
    assert "README.txt" in caplog.text
    assert len(ds) == 6 and ds.labels.tolist() == [0, 0, 1, 1, 2, 2]
    x = ds.inputs["input"]
    assert x.shape == (6, 3, 8, 8) and x.dtype == np.float32
    assert -2.0 - 1e-6 <= x.min() and x.max() <= 2.0 + 1e-6  # (v - 0.5) / 0.25 with v in [0, 1]


@pytest.mark.parametrize("odd_one", ["cats/x.png", "loose.png"])
def test_image_folder_labels_only_when_all_subfolders_are_integers(tmp_path, odd_one):
    root = tmp_path / "imgs"
    _save_png(root / "0" / "a.png", np.zeros((8, 8, 3), np.uint8))
    _save_png(root / "1" / "b.png", np.zeros((8, 8, 3), np.uint8))
    _save_png(root / odd_one, np.zeros((8, 8, 3), np.uint8))
    ds = load_data(root, [SPEC], PREP)
    assert len(ds) == 3 and ds.labels is None


def test_image_folder_values_follow_preprocessing(tmp_path):
    img = np.zeros((8, 8, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 255, 51, 0
    _save_png(tmp_path / "imgs" / "solid.png", img)
    ds = load_data(tmp_path / "imgs", [SPEC], PREP)
    x = ds.inputs["input"]
    assert ds.labels is None
    assert np.allclose(x[0, 0], (1.0 - 0.5) / 0.25)
    assert np.allclose(x[0, 1], (0.2 - 0.5) / 0.25, atol=1e-5)
    assert np.allclose(x[0, 2], (0.0 - 0.5) / 0.25)


def test_image_folder_resize_center_crop_and_grayscale(tmp_path):
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, 10:20] = 255  # white middle third survives the center crop
    _save_png(tmp_path / "imgs" / "wide.png", wide)
    spec = TensorSpec("x", ("N", 5, 5, 1))
    prep = Preprocessing(size=(5, 5), mean=(0.0,), std=(1.0,), layout="NHWC", channels=1)
    x = load_data(tmp_path / "imgs", [spec], prep).inputs["x"]
    assert x.shape == (1, 5, 5, 1)
    assert x[0, :, 1:4, 0].min() > 0.9


def test_limit_keeps_first_samples(tmp_path):
    x = _good(10)
    np.savez(tmp_path / "lab.npz", input=x, labels=np.arange(10))
    ds = load_data(tmp_path / "lab.npz", [SPEC], limit=3)
    assert len(ds) == 3 and np.array_equal(ds.inputs["input"], x[:3]) and ds.labels.tolist() == [0, 1, 2]
    assert len(load_data(tmp_path / "lab.npz", [SPEC], limit=50)) == 10


def test_limit_on_folder(tmp_path):
    for k in range(4):
        _save_png(tmp_path / "imgs" / f"{k}.png", np.full((8, 8, 3), 40 * k, np.uint8))
    ds = load_data(tmp_path / "imgs", [SPEC], PREP, limit=2)
    assert len(ds) == 2
    assert np.allclose(ds.inputs["input"][1], (40 / 255 - 0.5) / 0.25, atol=1e-5)


def test_builtin_through_load_data():
    prep = Preprocessing(size=(8, 8), mean=(0.0,), std=(1.0,), channels=1)
    ds = load_data("builtin:digits", [TensorSpec("x", ("N", 1, 8, 8))], prep, role="evaluation", limit=7)
    assert len(ds) == 7 and ds.labels.shape == (7,) and ds.source == "builtin:digits"


# --- Dataset ------------------------------------------------------------------------------------------


def test_sha256_changes_with_one_value():
    x = _good(3)
    a = Dataset("a", {"input": x}, None, "mem")
    same = Dataset("other-name", {"input": x.copy()}, None, "elsewhere")
    assert a.sha256() == same.sha256()
    y = x.copy()
    y[2, 1, 7, 7] += 1e-3
    assert Dataset("a", {"input": y}, None, "mem").sha256() != a.sha256()
    assert Dataset("a", {"input": x}, np.array([0, 1, 2]), "mem").sha256() != a.sha256()
    assert Dataset("a", {"other": x}, None, "mem").sha256() != a.sha256()


def test_batches_cover_every_sample_once():
    x = np.arange(7 * 2, dtype=np.float32).reshape(7, 2)
    ds = Dataset("d", {"a": x, "b": -x}, None, "mem")
    batches = list(ds.batches(3))
    assert [len(b["a"]) for b in batches] == [3, 3, 1]
    assert np.array_equal(np.concatenate([b["a"] for b in batches]), x)
    assert np.array_equal(np.concatenate([b["b"] for b in batches]), -x)
    with pytest.raises(ConfigError):
        next(ds.batches(0))


def test_take_and_feeds():
    x = _good(5)
    ds = Dataset("d", {"input": x}, np.arange(5), "mem")
    t = ds.take(2)
    assert len(t) == 2 and t.labels.tolist() == [0, 1]
    feeds = ds.feeds()
    assert len(feeds) == 5 and feeds[4]["input"].shape == (1, 3, 8, 8)
    assert np.array_equal(feeds[4]["input"][0], x[4])


def test_groups_follow_their_samples():
    """``groups`` (which samples share a source) travel with take/skip/subset, change the content hash, and must be
    one integer per sample; ``concat`` joins two sets' samples."""
    from edgekit.data import concat

    x = _good(6)
    ds = Dataset("d", {"input": x}, np.arange(6), "mem", groups=np.array([0, 1, 2, 0, 1, 2]))
    assert ds.take(4).groups.tolist() == [0, 1, 2, 0] and ds.skip(4).groups.tolist() == [1, 2]
    sub = ds.subset([5, 0])
    assert sub.groups.tolist() == [2, 0] and sub.labels.tolist() == [5, 0]
    assert np.array_equal(sub.inputs["input"], x[[5, 0]])
    plain = Dataset("d", {"input": x}, np.arange(6), "mem")
    assert plain.take(3).groups is None and plain.sha256() != ds.sha256()
    with pytest.raises(DataError, match="groups"):
        Dataset("d", {"input": x}, None, "mem", groups=np.zeros(5, np.int64))
    with pytest.raises(DataError, match="groups"):
        Dataset("d", {"input": x}, None, "mem", groups=np.zeros(6))
    both = concat(ds.take(2), plain.skip(4))
    assert len(both) == 4 and both.labels.tolist() == [0, 1, 4, 5] and both.groups is None
    assert np.array_equal(both.inputs["input"], x[[0, 1, 4, 5]])
    with pytest.raises(DataError, match="cannot join"):
        concat(ds, Dataset("e", {"other": x}, None, "mem"))


def test_builtin_photo_crops_say_which_photograph_they_come_from():
    from edgekit.datasets import PHOTO_SPLITS, builtin_dataset

    pre = Preprocessing(size=(16, 16), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), layout="NCHW")
    d = builtin_dataset("photos", "calibration", (TensorSpec("input", ("batch", 3, 16, 16), "float32"),), pre, n=23)
    assert d.groups.tolist() == [i % len(PHOTO_SPLITS["calibration"]) for i in range(23)]


def test_dataset_validation():
    with pytest.raises(DataError, match="different numbers"):
        Dataset("d", {"a": np.zeros((2, 1)), "b": np.zeros((3, 1))}, None, "mem")
    with pytest.raises(DataError, match="empty"):
        Dataset("d", {"a": np.zeros((0, 1))}, None, "mem")
    with pytest.raises(DataError, match="labels"):
        Dataset("d", {"a": np.zeros((2, 1))}, np.array([1]), "mem")


def test_integer_inputs_reads_dtypes_from_headers(tmp_path):
    from edgekit.data import integer_inputs

    plain, packed = tmp_path / "a.npz", tmp_path / "b.npz"
    arrays = dict(input_ids=np.ones((2, 4), np.int64), mask=np.ones((2, 4), np.int32), x=np.ones(2, np.float32),
                  labels=np.zeros(2, np.int64))
    np.savez(plain, **arrays)
    np.savez_compressed(packed, **arrays)
    for path in (plain, packed):
        assert integer_inputs(str(path)) == {"input_ids": "int64", "mask": "int32"}
    (tmp_path / "text.npz").write_text("not a zip")
    assert integer_inputs(str(tmp_path / "text.npz")) == {} and integer_inputs(str(tmp_path / "no.npz")) == {}
    assert integer_inputs("calib.npy") == {} and integer_inputs(None) == {}
