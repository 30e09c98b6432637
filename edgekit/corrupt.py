"""Corruptions of 8x8 sklearn-digits images, as in ImageNet-C, and long streams of mixed, changing corruptions.

Images are (N, H, W, C) float32 in [0, 1] -- what ``edgekit.datasets.digits(split)`` returns, (N, 8, 8, 1).
Five corruptions, each with severities 1 (mild) to 5 (clearly harmful):

- ``noise``: additive gaussian noise;
- ``blur``: gaussian blur (separable kernel, edge padding);
- ``contrast``: contrast reduction towards each image's mean;
- ``pixelate``: box downsampling, then nearest upsampling back, done at 2x (nearest-upscaled) working scale so the
  pixel blocks can be a fraction of a pixel on 8x8 images, then box-downscaled to the original size;
- ``jpeg``: JPEG compression (Pillow) of the image as 0..255 grayscale, with the 8x8 JPEG block grid shifted by
  half a block (edge padding, cropped after) so that blocks straddle the digit instead of being the whole image.

The severities were calibrated on the FP32 built-in ``digits-bn`` (and ``digits-cnn``) so that accuracy falls
gradually with severity. Measured top-1 accuracy (%) of the FP32 built-ins on the evaluation split of
``digits`` (450 images; seed 0 for the noise, whose accuracy moves by about +-2 points across seeds):

    ==========  =====  =====  =====  =====  =====  ==========================
    digits-bn       1      2      3      4      5  (clean 99.6)
    ==========  =====  =====  =====  =====  =====  ==========================
    noise        97.3   88.2   69.1   45.6   26.4  sigma .10 .18 .26 .36 .50
    blur         98.4   92.7   79.3   52.2   30.0  sigma .50 .60 .70 .85 1.05
    contrast     98.4   92.9   70.9   36.2   22.9  factor .85 .75 .65 .55 .45
    pixelate     98.9   97.6   92.7   60.4   53.6  side 13 11 9 7 5 (of 16)
    jpeg         97.8   94.0   84.2   73.1   42.2  quality 40 20 12 7 3
    ==========  =====  =====  =====  =====  =====  ==========================

    ==========  =====  =====  =====  =====  =====
    digits-cnn      1      2      3      4      5  (clean 97.6)
    ==========  =====  =====  =====  =====  =====
    noise        96.0   88.7   77.6   56.9   36.4
    blur         94.2   89.3   79.6   65.3   46.7
    contrast     97.1   95.3   92.2   86.0   72.9
    pixelate     96.2   94.9   89.8   74.7   66.4
    jpeg         95.1   94.0   86.7   73.8   42.9
    ==========  =====  =====  =====  =====  =====

(digits-bn, normalised with fixed running statistics, is much more sensitive to contrast than digits-cnn.)

``stream`` builds a long stream of samples from a schedule of ``(name or "clean", severity, length)`` segments;
``default_schedule`` gives one that cycles through every corruption at every severity, with clean segments.

numpy and Pillow only: no torch import, so an on-device benchmark can use it.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

CORRUPTIONS: tuple[str, ...] = ("noise", "blur", "contrast", "pixelate", "jpeg")
CLEAN = "clean"
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

# Per-corruption parameters for severities 1..5 (calibrated on 8x8 digits; see the table above).
NOISE_SIGMA = (0.10, 0.18, 0.26, 0.36, 0.50)  # std of the additive gaussian noise
BLUR_SIGMA = (0.50, 0.60, 0.70, 0.85, 1.05)  # std, in pixels, of the gaussian kernel
CONTRAST_FACTOR = (0.85, 0.75, 0.65, 0.55, 0.45)  # deviations from the image mean are scaled by this
PIXELATE_UPSCALE = 2  # working scale
PIXELATE_SIDE = (13, 11, 9, 7, 5)  # downsampled side at working scale, per 8 original pixels (16 working pixels)
JPEG_QUALITY = (40, 20, 12, 7, 3)
JPEG_SHIFT = 4  # pixels of edge padding before the JPEG encoder: half of its 8x8 block


def _check_images(images) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim != 4 or min(x.shape[1:3], default=0) < 2 or x.shape[3] < 1:
        raise ValueError(f"images must be (N, H, W, C) with H, W >= 2 and C >= 1 (digits: (N, 8, 8, 1)), not {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"images must be real numbers in [0, 1], not dtype {x.dtype}")
    x = x.astype(np.float32)
    if x.size and not np.isfinite(x).all():
        raise ValueError("images contain NaN or infinite values")
    return np.clip(x, 0.0, 1.0)


def _check_severity(severity, *, allow_zero: bool = False) -> int:
    ok = isinstance(severity, (int, np.integer)) and not isinstance(severity, bool)
    lo = 0 if allow_zero else 1
    if not ok or not lo <= int(severity) <= 5:
        raise ValueError(f"severity must be an integer {lo}..5, not {severity!r}")
    return int(severity)


def _check_name(name) -> str:
    if name != CLEAN and name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)} (or {CLEAN!r})")
    return name


def _noise(x: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    return x + rng.normal(0.0, NOISE_SIGMA[level - 1], size=x.shape).astype(np.float32)


def _blur(x: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    sigma = BLUR_SIGMA[level - 1]
    radius = max(1, int(np.ceil(3 * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    _, h, w, _ = x.shape
    for axis, size in ((1, h), (2, w)):
        pad = [(0, 0)] * 4
        pad[axis] = (radius, radius)
        p = np.pad(x, pad, mode="edge")
        out = np.zeros_like(x)
        for i, wi in enumerate(k):
            out += wi * np.take(p, np.arange(i, i + size), axis=axis)
        x = out
    return x


def _contrast(x: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return (x - mean) * CONTRAST_FACTOR[level - 1] + mean


def _per_plane(x: np.ndarray, fn) -> np.ndarray:
    """Apply ``fn`` (a 2-D float32 plane -> same-shape plane) to every image and channel."""
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        for c in range(x.shape[3]):
            out[i, :, :, c] = fn(np.ascontiguousarray(x[i, :, :, c]))
    return out


def _pixelate(x: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    _, h, w, _ = x.shape
    k = PIXELATE_UPSCALE
    frac = PIXELATE_SIDE[level - 1] / (8 * k)
    work = (w * k, h * k)
    small = (max(1, round(w * k * frac)), max(1, round(h * k * frac)))

    def one(plane: np.ndarray) -> np.ndarray:
        img = Image.fromarray(plane, mode="F").resize(work, Image.NEAREST)
        img = img.resize(small, Image.BOX).resize(work, Image.NEAREST)
        return np.asarray(img.resize((w, h), Image.BOX), np.float32)

    return _per_plane(x, one)


def _jpeg(x: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    _, h, w, _ = x.shape
    quality = JPEG_QUALITY[level - 1]
    s = JPEG_SHIFT

    def one(plane: np.ndarray) -> np.ndarray:
        padded = np.pad(np.round(plane * 255.0).astype(np.uint8), s, mode="edge")
        buf = io.BytesIO()
        Image.fromarray(padded, mode="L").save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as dec:
            back = np.asarray(dec.convert("L"), np.float32)
        return back[s : s + h, s : s + w] / 255.0

    return _per_plane(x, one)


_FUNCS = {"noise": _noise, "blur": _blur, "contrast": _contrast, "pixelate": _pixelate, "jpeg": _jpeg}


def corrupt(images, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """``images`` (N, H, W, C) in [0, 1] with corruption ``name`` at ``severity`` 1..5: float32, same shape, in [0, 1].

    Deterministic for a ``seed`` (only ``noise`` is random). ``name="clean"`` returns the images unchanged
    (as float32, clipped), with severity 0..5 accepted and ignored.
    """
    _check_name(name)
    level = _check_severity(severity, allow_zero=name == CLEAN)
    x = _check_images(images)
    if name == CLEAN or x.shape[0] == 0:
        return x.copy()
    out = _FUNCS[name](x, level, np.random.default_rng(seed))
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def stream(
    images, labels, *, segments: Sequence[tuple[str, int, int]], seed: int = 0
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, int]]]:
    """A long stream of corrupted samples following ``segments``: ``(name or "clean", severity, length)`` each.

    Every segment draws ``length`` samples with replacement from ``images``/``labels`` (seeded) and corrupts
    them. Returns ``(x, y, tags)``: x (L, H, W, C) float32, y (L,), and tags, a ``(name, severity)`` per
    sample (``("clean", 0)`` for clean samples), where L is the total of the segments' lengths.
    """
    x_all = _check_images(images)
    y_all = np.asarray(labels)
    if y_all.ndim < 1 or len(y_all) != len(x_all):
        raise ValueError(f"labels must have one entry per image ({len(x_all)}), not shape {y_all.shape}")
    if len(x_all) == 0:
        raise ValueError("stream needs at least one image")
    segs = list(segments)
    if not segs:
        raise ValueError("segments is empty")
    checked = []
    for i, seg in enumerate(segs):
        try:
            name, severity, length = seg
        except (TypeError, ValueError):
            raise ValueError(f"segment {i} must be (name, severity, length), not {seg!r}") from None
        _check_name(name)
        level = 0 if name == CLEAN else _check_severity(severity)
        if name == CLEAN:
            _check_severity(severity, allow_zero=True)
        if not isinstance(length, (int, np.integer)) or isinstance(length, bool) or length < 1:
            raise ValueError(f"segment {i}: length must be a positive integer, not {length!r}")
        checked.append((name, level, int(length)))
    xs, ys, tags = [], [], []
    for (name, level, length), child in zip(checked, np.random.SeedSequence(seed).spawn(len(checked))):
        rng = np.random.default_rng(child)
        idx = rng.integers(0, len(x_all), size=length)
        noise_seed = int(rng.integers(0, 2**63 - 1))
        xs.append(corrupt(x_all[idx], name, level, seed=noise_seed))
        ys.append(y_all[idx])
        tags.extend([(name, level)] * length)
    return np.concatenate(xs), np.concatenate(ys), tags


def default_schedule(length_per_segment: int = 100, seed: int = 0, rounds: int = 5) -> list[tuple[str, int, int]]:
    """A schedule of mixed, changing corruptions: ``rounds`` rounds, each every corruption once, in a seeded order.

    Severities follow a seeded Latin square, so with 5 rounds every (corruption, severity) pair appears exactly
    once; a clean segment starts the stream and separates the rounds. The default is 30 segments
    (25 corrupted, 5 clean) of ``length_per_segment`` samples each.
    """
    if not isinstance(length_per_segment, (int, np.integer)) or length_per_segment < 1:
        raise ValueError(f"length_per_segment must be a positive integer, not {length_per_segment!r}")
    if not isinstance(rounds, (int, np.integer)) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, not {rounds!r}")
    rng = np.random.default_rng(seed)
    n = len(SEVERITIES)
    offsets = np.concatenate([rng.permutation(n) for _ in range(-(-rounds // n))])[:rounds]
    length = int(length_per_segment)
    schedule: list[tuple[str, int, int]] = [(CLEAN, 0, length)]
    for r in range(rounds):
        for c in rng.permutation(len(CORRUPTIONS)):
            schedule.append((CORRUPTIONS[c], SEVERITIES[(int(c) + int(offsets[r])) % n], length))
        if r < rounds - 1:
            schedule.append((CLEAN, 0, length))
    return schedule
