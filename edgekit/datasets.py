"""Built-in real data that works offline: photo crops and handwritten digits shipped with scikit-image/-learn.

``photos`` cuts random crops out of the natural photographs that scikit-image and scikit-learn install with
their packages (no download). Calibration and evaluation use *disjoint* source photographs, so a model is never
evaluated on crops of the pictures it was calibrated on:

- calibration: astronaut, motorcycle_left, hubble_deep_field, ihc (colour); camera, coins, moon, brick, grass,
  gravel (grayscale, stacked to RGB) -- varied content and textures for activation ranges;
- evaluation: chelsea, coffee, rocket, retina (scikit-image) and china, flower (scikit-learn) -- all colour.

Synthetic pictures (color, logo, chessboard, phantom, horse), scans (page, text) and the near-duplicate
``motorcycle_right`` are deliberately not used.

``digits`` is scikit-learn's 8x8 digits set with a fixed-seed stratified train/calibration/evaluation split.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgekit.data import Dataset, conform, only_input
from edgekit.errors import ConfigError, DataError
from edgekit.iospec import Preprocessing, TensorSpec

log = logging.getLogger(__name__)

# name -> (package, path inside the package)
_SOURCES: dict[str, tuple[str, str]] = {
    "astronaut": ("skimage", "data/astronaut.png"),
    "motorcycle_left": ("skimage", "data/motorcycle_left.png"),
    "hubble_deep_field": ("skimage", "data/hubble_deep_field.jpg"),
    "ihc": ("skimage", "data/ihc.png"),
    "camera": ("skimage", "data/camera.png"),
    "coins": ("skimage", "data/coins.png"),
    "moon": ("skimage", "data/moon.png"),
    "brick": ("skimage", "data/brick.png"),
    "grass": ("skimage", "data/grass.png"),
    "gravel": ("skimage", "data/gravel.png"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "retina": ("skimage", "data/retina.jpg"),
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
}

CALIBRATION_SOURCES: tuple[str, ...] = (
    "astronaut", "motorcycle_left", "hubble_deep_field", "ihc",
    "camera", "coins", "moon", "brick", "grass", "gravel",
)  # fmt: skip
EVALUATION_SOURCES: tuple[str, ...] = ("chelsea", "coffee", "rocket", "retina", "china", "flower")
PHOTO_SPLITS: dict[str, tuple[str, ...]] = {
    "calibration": CALIBRATION_SOURCES,
    "evaluation": EVALUATION_SOURCES,
}
DIGITS_SPLITS: dict[str, float] = {"train": 0.60, "calibration": 0.15, "evaluation": 0.25}
BUILTIN_NAMES: tuple[str, ...] = ("photos", "digits")
_PHOTO_DEFAULT_N = {"calibration": 64, "evaluation": 128}


def _source_path(name: str) -> Path:
    package, rel = _SOURCES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"built-in photo {name!r} cannot be loaded: package {package!r} is not installed",
            hint="install edgekit[build] (it brings scikit-image and scikit-learn)",
        )
    return Path(next(iter(spec.submodule_search_locations))) / rel


@functools.cache
def load_source(name: str) -> np.ndarray:
    """One source photograph as a read-only (H, W, 3) uint8 RGB array (grayscale stacked, alpha dropped)."""
    from PIL import Image

    if name not in _SOURCES:
        raise DataError(f"unknown built-in photo {name!r}; known: {', '.join(sorted(_SOURCES))}")
    path = _source_path(name)
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise DataError(f"built-in photo {name!r} cannot be loaded from {path}: {e}") from e
    arr = arr.copy()
    arr.setflags(write=False)
    return arr


def _split_sources(split: str) -> tuple[str, ...]:
    if split not in PHOTO_SPLITS:
        raise ConfigError(f"photos split must be one of {', '.join(PHOTO_SPLITS)}, not {split!r}")
    return PHOTO_SPLITS[split]


def photo_crops(
    split: str, n: int, size: tuple[int, int], seed: int = 0, *, channels: int = 3
) -> np.ndarray:
    """``n`` random crops resized to ``size`` (H, W): (n, H, W, channels) float32 in [0, 1].

    Each crop covers a uniform 50-100 % of the source's shorter side (with the target's aspect ratio), sits at
    a random position, is flipped horizontally with probability 1/2, and is resized with an anti-aliasing
    bilinear filter. Crops go round-robin over the split's sources. The draws are sequential, so the first
    ``k`` crops of a larger ``n`` equal the crops of ``n=k`` with the same seed.
    """
    from PIL import Image

    sources = _split_sources(split)
    if n < 1:
        raise ConfigError(f"number of photos must be at least 1, not {n}")
    out_h, out_w = int(size[0]), int(size[1])
    if out_h < 1 or out_w < 1:
        raise ConfigError(f"photo size must be positive, not {size}")
    aspect = out_w / out_h
    rng = np.random.default_rng(seed)
    out = np.empty((n, out_h, out_w, channels), np.float32)
    for i in range(n):
        src = load_source(sources[i % len(sources)])
        h, w = src.shape[:2]
        side = rng.uniform(0.5, 1.0) * min(h, w)
        ch, cw = (side / aspect, side) if aspect >= 1 else (side, side * aspect)
        ch, cw = max(1, int(round(ch))), max(1, int(round(cw)))
        top = int(rng.integers(0, h - ch + 1))
        left = int(rng.integers(0, w - cw + 1))
        flip = bool(rng.random() < 0.5)
        img = Image.fromarray(src[top : top + ch, left : left + cw])
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if channels == 1:
            img = img.convert("L")
        img = img.resize((out_w, out_h), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.float32) / 255.0
        out[i] = arr[..., None] if arr.ndim == 2 else arr
    return out


def photos(split: str, n: int, size: int = 224, seed: int = 0) -> np.ndarray:
    """``n`` random square crops of real photographs: (n, size, size, 3) float32 in [0, 1].

    ``split`` is ``"calibration"`` or ``"evaluation"``; the two draw from disjoint source photographs.
    The same (split, n, size, seed) always gives the same array.
    """
    return photo_crops(split, n, (size, size), seed)


@functools.lru_cache(maxsize=4)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (np.asarray(d.images, np.float32) / 16.0)[..., None]
    labels = np.asarray(d.target, np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


@functools.lru_cache(maxsize=8)
def _digits_split_indices(seed: int) -> dict[str, np.ndarray]:
    from sklearn.model_selection import train_test_split

    _, labels = _digits_raw()
    idx = np.arange(len(labels))
    fr = DIGITS_SPLITS
    rest, evaluation = train_test_split(
        idx, test_size=fr["evaluation"], stratify=labels, random_state=seed
    )
    cal_share = fr["calibration"] / (fr["train"] + fr["calibration"])
    train, calibration = train_test_split(
        rest, test_size=cal_share, stratify=labels[rest], random_state=seed
    )
    out = {"train": np.sort(train), "calibration": np.sort(calibration), "evaluation": np.sort(evaluation)}
    for v in out.values():
        v.setflags(write=False)
    return out


def digits_split_indices(seed: int = 0) -> dict[str, np.ndarray]:
    """Sorted sample indices into ``load_digits()`` for each split (train 60 %, calibration 15 %, evaluation 25 %)."""
    return {k: v.copy() for k, v in _digits_split_indices(int(seed)).items()}


def digits(split: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One split of scikit-learn's digits: images (N, 8, 8, 1) float32 in [0, 1], labels (N,) int64."""
    if split not in DIGITS_SPLITS:
        raise ConfigError(f"digits split must be one of {', '.join(DIGITS_SPLITS)}, not {split!r}")
    images, labels = _digits_raw()
    idx = _digits_split_indices(int(seed))[split]
    return images[idx].copy(), labels[idx].copy()


def _resize_batch(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize (N, h, w, C) float images to (N, H, W, C) with an anti-aliasing bilinear filter."""
    from PIL import Image

    out_h, out_w = int(size[0]), int(size[1])
    if images.shape[1:3] == (out_h, out_w):
        return images
    n, _, _, c = images.shape
    out = np.empty((n, out_h, out_w, c), np.float32)
    for i in range(n):
        for k in range(c):
            img = Image.fromarray(np.ascontiguousarray(images[i, :, :, k], np.float32), mode="F")
            out[i, :, :, k] = np.asarray(img.resize((out_w, out_h), Image.BILINEAR), np.float32)
    return np.clip(out, 0.0, 1.0)


def builtin_dataset(
    name: str,
    role: str,
    inputs: Sequence[TensorSpec],
    preprocessing: Preprocessing,
    *,
    n: int | None = None,
    seed: int = 0,
) -> Dataset:
    """A built-in dataset (``photos`` or ``digits``) preprocessed into the model's input layout and dtype.

    ``role`` picks the split: ``calibration`` or ``evaluation`` (and ``train`` for digits). Photos default to
    64 calibration / 128 evaluation crops and carry no labels, and their ``groups`` say which photograph each crop
    comes from (``group_names``: the split's photographs); digits carry labels and ``n`` keeps the first ``n``
    samples of the split.
    """
    if name not in BUILTIN_NAMES:
        raise ConfigError(
            f"unknown built-in dataset {name!r}; known: {', '.join(BUILTIN_NAMES)}",
            hint="use builtin:photos or builtin:digits, or pass a .npy/.npz file or an image folder",
        )
    if preprocessing is None:
        raise ConfigError(
            f"built-in dataset {name!r} needs the model's preprocessing (size, mean, std, layout)",
            hint="pass --preprocessing or describe it in the model's plan",
        )
    if n is not None and n < 1:
        raise ConfigError(f"number of samples must be at least 1, not {n}")
    spec = only_input(inputs, f"built-in dataset {name!r}", error=ConfigError)
    source = f"builtin:{name}"
    if name == "photos":
        if role not in PHOTO_SPLITS:
            raise ConfigError(f"builtin:photos has no {role!r} split; use one of {', '.join(PHOTO_SPLITS)}")
        count = n if n is not None else _PHOTO_DEFAULT_N[role]
        raw = photo_crops(role, count, preprocessing.size, seed, channels=preprocessing.channels)
        labels = None
        groups = np.arange(count) % len(PHOTO_SPLITS[role])  # crops go round-robin over the split's photographs
        names = PHOTO_SPLITS[role]
    else:
        images, labels = digits(role, seed)
        if n is not None:
            images, labels = images[:n], labels[:n]
        groups = names = None  # every digit is its own image
        raw = _resize_batch(images, preprocessing.size)
        if preprocessing.channels == 3:
            raw = np.repeat(raw, 3, axis=-1)
    x = preprocessing.apply(raw)
    x = conform(x, spec, source=source, layout=preprocessing.layout)
    log.debug("built-in %s/%s: %d samples of %s", name, role, len(x), x.shape[1:])
    return Dataset(name=f"{name}-{role}", inputs={spec.name: x}, labels=labels, source=source, groups=groups,
                   group_names=names)
