"""edgekit.corrupt: ImageNet-C-style corruptions of 8x8 digits and streams of changing corruptions."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgekit import corrupt as C


@pytest.fixture(scope="module")
def data():
    """60 sklearn digits, (N, 8, 8, 1) float32 in [0, 1], from sklearn's data file (importing sklearn is slow)."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    raw = np.loadtxt(path, delimiter=",", max_rows=60)
    x, y = (raw[:, :64] / 16.0).astype(np.float32).reshape(-1, 8, 8, 1), raw[:, 64].astype(np.int64)
    x.setflags(write=False)
    return x, y


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_shape_dtype_range_and_determinism(data, name):
    x, _ = data
    for severity in C.SEVERITIES:
        out = C.corrupt(x, name, severity, seed=3)
        assert out.shape == x.shape and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.0
        np.testing.assert_array_equal(out, C.corrupt(x, name, severity, seed=3))
    assert not np.shares_memory(C.corrupt(x, name, 1), x)
    before = x.copy()
    C.corrupt(x, name, 5)
    np.testing.assert_array_equal(x, before)  # the input is not modified


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_distortion_grows_with_severity(data, name):
    x, _ = data
    mse = [float(((C.corrupt(x, name, s) - x) ** 2).mean()) for s in C.SEVERITIES]
    assert mse[0] > 0
    assert all(a < b for a, b in zip(mse, mse[1:])), mse


def test_noise_seeds_and_deterministic_corruptions(data):
    x, _ = data
    assert not np.array_equal(C.corrupt(x, "noise", 3, seed=0), C.corrupt(x, "noise", 3, seed=1))
    for name in ("blur", "contrast", "pixelate", "jpeg"):
        np.testing.assert_array_equal(C.corrupt(x, name, 3, seed=0), C.corrupt(x, name, 3, seed=1))


def test_clean_other_shapes_and_dtypes(data):
    x, _ = data
    np.testing.assert_array_equal(C.corrupt(x, "clean", 0), x)
    assert C.corrupt(x[:0], "blur", 2).shape == (0, 8, 8, 1)
    rgb = np.random.default_rng(0).random((2, 12, 10, 3))  # float64, another size and 3 channels
    for name in C.CORRUPTIONS:
        out = C.corrupt(rgb, name, 4)
        assert out.shape == rgb.shape and out.dtype == np.float32


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("fog", 1), "unknown corruption"),
        (("noise", 0), "severity"),
        (("noise", 6), "severity"),
        (("noise", 2.0), "severity"),
        (("noise", True), "severity"),
        (("clean", 6), "severity"),
    ],
)
def test_bad_name_or_severity(data, args, match):
    with pytest.raises(ValueError, match=match):
        C.corrupt(data[0], *args)


@pytest.mark.parametrize("shape", [(8, 8, 1), (8, 8), (2, 1, 8, 1), (2, 8, 8, 0), (1, 2, 8, 8, 1)])
def test_bad_shape(shape):
    with pytest.raises(ValueError, match="images must be"):
        C.corrupt(np.zeros(shape, np.float32), "blur", 1)


def test_bad_values():
    with pytest.raises(ValueError, match="NaN"):
        C.corrupt(np.full((1, 8, 8, 1), np.nan, np.float32), "blur", 1)
    with pytest.raises(ValueError, match="dtype"):
        C.corrupt(np.full((1, 8, 8, 1), "a"), "blur", 1)


def test_stream(data):
    x, y = data
    segments = [("clean", 0, 7), ("noise", 5, 5), ("jpeg", 2, 3), ("clean", 3, 4)]
    xs, ys, tags = C.stream(x, y, segments=segments, seed=1)
    assert xs.shape == (19, 8, 8, 1) and xs.dtype == np.float32 and ys.shape == (19,) and ys.dtype == y.dtype
    assert tags == [("clean", 0)] * 7 + [("noise", 5)] * 5 + [("jpeg", 2)] * 3 + [("clean", 0)] * 4
    assert xs.min() >= 0.0 and xs.max() <= 1.0
    # clean samples are drawn unchanged from the data, with their labels
    for i in [*range(7), *range(15, 19)]:
        match = np.flatnonzero((x == xs[i]).all(axis=(1, 2, 3)))
        assert match.size and (y[match] == ys[i]).any()
    again = C.stream(x, y, segments=segments, seed=1)
    np.testing.assert_array_equal(again[0], xs)
    np.testing.assert_array_equal(again[1], ys)
    assert not np.array_equal(C.stream(x, y, segments=segments, seed=2)[0], xs)


@pytest.mark.parametrize(
    ("segments", "match"),
    [
        ([], "empty"),
        ([("noise", 1)], "segment 0"),
        ([("clean", 0, 2), ("noise", 1, 0)], "segment 1: length"),
        ([("noise", 1, 2.5)], "length"),
        ([("fog", 1, 2)], "unknown corruption"),
        ([("noise", 0, 2)], "severity"),
    ],
)
def test_stream_errors(data, segments, match):
    with pytest.raises(ValueError, match=match):
        C.stream(*data, segments=segments)


def test_stream_label_mismatch(data):
    x, y = data
    with pytest.raises(ValueError, match="labels"):
        C.stream(x, y[:-1], segments=[("noise", 1, 2)])


def test_default_schedule(data):
    sched = C.default_schedule(length_per_segment=2, seed=0)
    assert 25 <= len(sched) <= 40 and all(length == 2 for _, _, length in sched)
    corrupted = [(n, s) for n, s, _ in sched if n != "clean"]
    assert sorted(corrupted) == sorted((n, s) for n in C.CORRUPTIONS for s in C.SEVERITIES)  # each pair once
    assert sched[0][0] == "clean" and sum(n == "clean" for n, _, _ in sched) >= 3
    assert all(a[0] != b[0] for a, b in zip(sched, sched[1:]))  # the corruption changes at every segment
    assert sched == C.default_schedule(length_per_segment=2, seed=0)
    assert sched != C.default_schedule(length_per_segment=2, seed=1)
    xs, ys, tags = C.stream(*data, segments=sched, seed=0)
    assert len(xs) == len(ys) == len(tags) == 2 * len(sched)
    with pytest.raises(ValueError, match="length_per_segment"):
        C.default_schedule(length_per_segment=0)


def test_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['sklearn'] = None;"
        "import numpy as np, edgekit.corrupt as c;"
        "x = np.random.default_rng(0).random((3, 8, 8, 1)).astype(np.float32);"
        "[c.corrupt(x, n, 5) for n in c.CORRUPTIONS];"
        "c.stream(x, np.arange(3), segments=c.default_schedule(length_per_segment=1));"
        "print('ok')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr
