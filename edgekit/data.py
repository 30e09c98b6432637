"""User data for calibration and evaluation: .npy, .npz, image folders or built-in sets, validated against the model.

Every problem a user can cause raises :class:`~edgekit.errors.DataError` naming the file (and the input) at fault.
"""

from __future__ import annotations

import hashlib
import logging
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekit.errors import ConfigError, DataError, EdgekitError
from edgekit.iospec import Preprocessing, TensorSpec

log = logging.getLogger(__name__)

_FOLDER_HINT = (
    "image folders work with the built-in models, whose preprocessing is known; "
    "for other models save the preprocessed tensors as .npy/.npz"
)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
ROLES = ("calibration", "evaluation", "train")
ACCEPTED_FORMS = (
    "builtin:<name> (builtin:photos, builtin:digits), a .npy file (single-input models), "
    "a .npz file (one array per input name, optional 'labels'), or a folder of images"
)
LABELS_KEY = "labels"


@dataclass(frozen=True, eq=False)
class Dataset:
    """Samples ready to feed: ``inputs`` maps each input name to an (N, ...) array in the model's layout and dtype.

    ``groups`` (optional, one integer per sample) says which samples are *not* independent: samples with the same id
    come from one source (crops of one photograph). Whatever holds samples out to check a fit (``edgekit.structure``,
    ``compress.refit``) holds out whole groups, since a fit to some crops of a picture also fits its other crops.
    ``group_names`` (optional, with ``groups``) names the sources by id (``group_names[g]``); verification reports
    top-1 agreement per source with them (``edgekit.verify``). Neither name nor group names enter ``sha256``.
    """

    name: str
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str
    groups: np.ndarray | None = None
    group_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not self.inputs:
            raise DataError(f"{self.source}: dataset {self.name!r} has no inputs")
        inputs = {str(k): np.asarray(v) for k, v in self.inputs.items()}
        sizes = {k: (v.shape[0] if v.ndim else 0) for k, v in inputs.items()}
        if len(set(sizes.values())) != 1:
            raise DataError(f"{self.source}: inputs have different numbers of samples: {sizes}")
        n = next(iter(sizes.values()))
        if n < 1:
            raise DataError(f"{self.source}: dataset {self.name!r} is empty (0 samples)")
        object.__setattr__(self, "inputs", inputs)
        if self.labels is not None:
            object.__setattr__(self, "labels", _check_labels(self.labels, n, self.source))
        if self.groups is not None:
            groups = np.asarray(self.groups)
            if groups.dtype.kind not in "iu" or groups.shape != (n,):
                raise DataError(f"{self.source}: sample groups must be one integer per sample, got "
                                f"{groups.dtype} {groups.shape} for {n} samples")
            object.__setattr__(self, "groups", groups.astype(np.int64))
        if self.group_names is not None:
            names = tuple(str(x) for x in self.group_names)
            if self.groups is None or int(self.groups.min()) < 0 or int(self.groups.max()) >= len(names):
                raise DataError(f"{self.source}: group names need sample groups with ids in 0..{len(names) - 1}")
            object.__setattr__(self, "group_names", names)

    def __len__(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def sha256(self) -> str:
        """A stable hash of the content: input names, shapes, dtypes, bytes and labels (not name or source)."""
        h = hashlib.sha256()
        for key in sorted(self.inputs):
            arr = np.ascontiguousarray(self.inputs[key])
            h.update(f"input:{key}:{arr.dtype.str}:{arr.shape}\n".encode())
            h.update(arr.tobytes())
        if self.labels is None:
            h.update(b"labels:none\n")
        else:
            lab = np.ascontiguousarray(self.labels, np.int64)
            h.update(f"labels:{lab.shape}\n".encode())
            h.update(lab.astype("<i8").tobytes())
        if self.groups is not None:  # they decide which samples are held out (datasets without them hash as before)
            h.update(f"groups:{self.groups.shape}\n".encode())
            h.update(self.groups.astype("<i8").tobytes())
        return h.hexdigest()

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Consecutive batches of at most ``batch_size`` samples, covering every sample exactly once."""
        if batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, not {batch_size}")
        for start in range(0, len(self), batch_size):
            yield {k: v[start : start + batch_size] for k, v in self.inputs.items()}

    def take(self, n: int) -> Dataset:
        """The first ``n`` samples (all of them when there are fewer)."""
        if n < 1:
            raise ConfigError(f"take needs at least 1 sample, not {n}")
        return self.subset(slice(0, n))

    def skip(self, n: int) -> Dataset:
        """The samples after the first ``n`` (raises ConfigError when none are left)."""
        if n >= len(self):
            raise ConfigError(f"skip({n}) leaves no samples of {len(self)}")
        return self.subset(slice(n, None))

    def subset(self, index: slice | Sequence[int] | np.ndarray) -> Dataset:
        """The samples at ``index`` (a slice, or sample indices in the order wanted), labels and groups with them."""
        index = index if isinstance(index, slice) else np.asarray(index, np.int64)
        labels = None if self.labels is None else self.labels[index]
        groups = None if self.groups is None else self.groups[index]
        return Dataset(self.name, {k: v[index] for k, v in self.inputs.items()}, labels, self.source, groups,
                       self.group_names)

    def feeds(self) -> list[dict[str, np.ndarray]]:
        """One feed dict per sample, each array with batch dimension 1 (e.g. for an ORT calibration reader)."""
        return [{k: v[i : i + 1] for k, v in self.inputs.items()} for i in range(len(self))]


def concat(first: Dataset, second: Dataset) -> Dataset:
    """The samples of ``first`` then ``second`` (the same input names; labels only when both have them)."""
    if set(first.inputs) != set(second.inputs):
        raise DataError(f"cannot join {first.source} and {second.source}: inputs {sorted(first.inputs)} and "
                        f"{sorted(second.inputs)}")
    labels = None if first.labels is None or second.labels is None else np.concatenate([first.labels, second.labels])
    inputs = {k: np.concatenate([v, second.inputs[k].astype(v.dtype)]) for k, v in first.inputs.items()}
    return Dataset(f"{first.name}+{second.name}", inputs, labels, f"{first.source} + {second.source}")


def _check_labels(labels: object, n: int, source: str) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.dtype.kind not in "iu":
        raise DataError(
            f"{source}: labels must be integer class indices, got dtype {lab.dtype}",
            hint="save them with labels.astype('int64')",
        )
    if lab.shape != (n,):
        raise DataError(f"{source}: labels have shape {lab.shape}, expected ({n},) -- one per sample")
    if n and int(lab.min()) < 0:
        raise DataError(f"{source}: labels must be non-negative class indices, found {int(lab.min())}")
    return lab.astype(np.int64)


def _fmt_shape(shape: Sequence[object]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _shape_hint(expected: tuple, got: tuple, layout: str | None) -> str:
    where = f" in {layout}" if layout else ""
    hint = f"the model expects {_fmt_shape(expected)} per sample{where}"
    if len(got) == 3 and len(expected) == 3:
        if all(isinstance(e, str) or e == g for e, g in zip(expected, (got[2], got[0], got[1]))):
            hint += "; your data looks channels-last (NHWC): transpose it with x.transpose(0, 3, 1, 2)"
        elif all(isinstance(e, str) or e == g for e, g in zip(expected, (got[1], got[2], got[0]))):
            hint += "; your data looks channels-first (NCHW): transpose it with x.transpose(0, 2, 3, 1)"
    return hint


def conform(
    arr: np.ndarray, spec: TensorSpec, *, source: str, layout: str | None = None
) -> np.ndarray:
    """Check a batch (N, ...) against ``spec`` (dtype kind, finite values, sample shape) and cast to its dtype."""
    arr = np.asarray(arr)
    what = f"{source}: input {spec.name!r}"
    if arr.dtype.kind not in "iuf":
        raise DataError(
            f"{what} has dtype {arr.dtype}, which cannot feed a {spec.dtype} input",
            hint="save plain numeric arrays (ints or floats)",
        )
    if arr.ndim >= 1 and arr.shape[0] == 0:
        raise DataError(f"{what} is empty (0 samples)")
    if arr.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            raise DataError(f"{what} has {bad} NaN or Inf value(s)", hint="clean or drop those samples")
    expected = tuple(spec.shape[1:])
    got = tuple(arr.shape[1:]) if arr.ndim else ()
    matches = len(got) == len(expected) and all(isinstance(e, str) or e == g for e, g in zip(expected, got))
    if arr.ndim == 0 or not matches:
        raise DataError(
            f"{what}: expected samples of shape {_fmt_shape(expected)}, got {_fmt_shape(got)} "
            f"(array shape {_fmt_shape(arr.shape)})",
            hint=_shape_hint(expected, got, layout),
        )
    out = arr.astype(spec.np_dtype, copy=False)
    if out.dtype.kind == "f" and out.dtype != arr.dtype:
        bad = int(np.count_nonzero(~np.isfinite(out)))
        if bad:
            raise DataError(f"{what} has {bad} value(s) that overflow {spec.dtype}")
    return out


def _with_batch(arr: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Take an array of exactly one sample's rank as a batch of one."""
    if arr.ndim == len(spec.shape) - 1:
        return arr[None]
    return arr


def only_input(inputs: Sequence[TensorSpec], source: str, *, error: type[EdgekitError] = DataError) -> TensorSpec:
    """The model's single input; ``source`` (a file or data set that feeds one tensor) cannot feed more."""
    if len(inputs) != 1:
        names = ", ".join(s.name for s in inputs) or "none"
        raise error(
            f"{source} can only feed a single-input model, but this one has inputs: {names}",
            hint="pass a .npz with one array per input name",
        )
    return inputs[0]


def _load_npy(path: Path, inputs: Sequence[TensorSpec], layout: str | None) -> tuple[dict, None]:
    spec = only_input(inputs, f"{path}: a .npy file")
    try:
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                raise DataError(f"{path}: not a .npy file (no NumPy header)", hint="write it with numpy.save")
            f.seek(0)
            arr = np.load(f, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        if "pickle" in str(e):
            raise DataError(
                f"{path}: holds Python objects (dtype object), not numbers; data files are never unpickled",
                hint="save a numeric array: numpy.save(path, x.astype('float32'))",
            ) from e
        raise DataError(f"{path}: not a readable .npy file ({e})", hint="write it with numpy.save") from e
    if not isinstance(arr, np.ndarray):
        raise DataError(f"{path}: not a .npy array file", hint="write it with numpy.save")
    return {spec.name: conform(_with_batch(arr, spec), spec, source=str(path), layout=layout)}, None


def _load_npz(path: Path, inputs: Sequence[TensorSpec], layout: str | None) -> tuple[dict, np.ndarray | None]:
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":  # every .npz is a zip archive
                raise DataError(f"{path}: not a readable .npz file (no zip signature)",
                                hint="write it with numpy.savez")
            f.seek(0)
            z = np.load(f, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise DataError(f"{path}: not a .npz archive", hint="write it with numpy.savez")
            with z:
                raw = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e})", hint="write it with numpy.savez") from e
    labels = raw.pop(LABELS_KEY, None)
    names = [s.name for s in inputs]
    if len(inputs) == 1 and names[0] not in raw and len(raw) == 1:
        raw = {names[0]: next(iter(raw.values()))}
    missing = [n for n in names if n not in raw]
    if missing:
        present = ", ".join(sorted(raw)) or "none"
        raise DataError(
            f"{path}: missing array for input(s) {', '.join(map(repr, missing))}; keys present: {present}",
            hint=f"save one array per model input: numpy.savez(path, {names[0]}=x, ...)",
        )
    unused = sorted(set(raw) - set(names))
    if unused:
        log.warning("%s: ignoring arrays that match no model input: %s", path, ", ".join(unused))
    out = {s.name: conform(_with_batch(raw[s.name], s), s, source=str(path), layout=layout) for s in inputs}
    return out, labels


def _integer_name(name: str) -> bool:
    try:
        int(name)
    except ValueError:
        return False
    return True


def _list_images(folder: Path) -> list[Path]:
    files = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            log.debug("skipping hidden file %s", p)
        elif p.suffix.lower() in IMAGE_EXTENSIONS:
            files.append(p)
        else:
            log.warning("%s: not an image (extension %r), skipped", p, p.suffix)
    return files


def _read_image(path: Path, prep: Preprocessing) -> np.ndarray:
    """One image, resized so its shorter side covers ``prep.size`` and center-cropped: (H, W, C) floats in [0, 1]."""
    from PIL import Image

    out_h, out_w = prep.size
    try:
        with Image.open(path) as img:
            img.seek(0)
            img.load()
            if img.mode.startswith("I;16") or img.mode in ("I", "F"):
                arr = np.asarray(img, np.float32)
                scale = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
                img = Image.fromarray(np.clip(arr / scale * 255.0, 0, 255).astype(np.uint8), mode="L")
            img = img.convert("L" if prep.channels == 1 else "RGB")
            w, h = img.size
            scale = max(out_h / h, out_w / w)
            new_w, new_h = max(out_w, round(w * scale)), max(out_h, round(h * scale))
            img = img.resize((new_w, new_h), Image.BILINEAR)
            left, top = (new_w - out_w) // 2, (new_h - out_h) // 2
            img = img.crop((left, top, left + out_w, top + out_h))
            arr = np.asarray(img, np.float32) / 255.0
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read image ({e})", hint="remove or re-save the file") from e
    return arr[..., None] if arr.ndim == 2 else arr


def _load_folder(
    folder: Path, inputs: Sequence[TensorSpec], prep: Preprocessing | None, limit: int | None
) -> tuple[dict, np.ndarray | None]:
    spec = only_input(inputs, f"{folder}: a folder of images")
    if prep is None:
        raise ConfigError(
            f"{folder}: reading a folder of images needs the model's preprocessing (size, mean, std, layout)",
            hint=_FOLDER_HINT,
        )
    files = _list_images(folder)
    if not files:
        raise DataError(
            f"{folder}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, recursively)"
        )
    tops = [f.relative_to(folder).parts for f in files]
    labelled = all(len(parts) >= 2 and _integer_name(parts[0]) for parts in tops)
    if limit is not None:
        files, tops = files[:limit], tops[:limit]
    images = np.stack([_read_image(f, prep) for f in files])
    x = conform(prep.apply(images), spec, source=str(folder), layout=prep.layout)
    labels = np.array([int(parts[0]) for parts in tops], np.int64) if labelled else None
    log.info("%s: %d images%s", folder, len(files), ", labelled by subfolder" if labelled else "")
    return {spec.name: x}, labels


def load_data(
    spec: str | Path,
    inputs: Sequence[TensorSpec],
    preprocessing: Preprocessing | None = None,
    *,
    role: str = "calibration",
    limit: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Load and validate data for the model's ``inputs``.

    ``spec`` is ``builtin:<name>``, a ``.npy`` file, a ``.npz`` file, or a folder of images (see ACCEPTED_FORMS).
    ``role`` (calibration/evaluation/train) picks a built-in split; ``limit`` keeps the first ``limit`` samples;
    ``seed`` drives built-in crop/split randomness.
    """
    if role not in ROLES:
        raise ConfigError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be at least 1, not {limit}")
    if not inputs:
        raise ConfigError("the model has no inputs to feed")
    if isinstance(spec, str) and spec.startswith("builtin:"):
        from edgekit.datasets import builtin_dataset

        name = spec.split(":", 1)[1]
        if preprocessing is None:
            raise ConfigError(
                f"{spec} needs the model's preprocessing (size, mean, std, layout)",
                hint=_FOLDER_HINT,
            )
        return builtin_dataset(name, role, inputs, preprocessing, n=limit, seed=seed)
    path = Path(spec).expanduser()
    layout = preprocessing.layout if preprocessing is not None else None
    if not path.exists():
        raise DataError(f"{path}: no such file or folder", hint=f"accepted: {ACCEPTED_FORMS}")
    if path.is_dir():
        arrays, labels = _load_folder(path, inputs, preprocessing, limit)
    elif path.suffix.lower() == ".npy":
        arrays, labels = _load_npy(path, inputs, layout)
    elif path.suffix.lower() == ".npz":
        arrays, labels = _load_npz(path, inputs, layout)
    else:
        hint = None
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            hint = "put single images in a folder and pass the folder"
        raise DataError(f"{path}: unsupported data file {path.suffix!r}; accepted: {ACCEPTED_FORMS}", hint=hint)
    if labels is not None:
        n = next(iter(arrays.values())).shape[0]
        labels = _check_labels(labels, n, str(path))
    if limit is not None:
        arrays = {k: v[:limit] for k, v in arrays.items()}
        labels = None if labels is None else labels[:limit]
    ds = Dataset(name=path.stem or path.name, inputs=arrays, labels=labels, source=str(path))
    log.info("loaded %d samples from %s", len(ds), path)
    return ds


def integer_inputs(spec: str | None) -> dict[str, str]:
    """Names and dtypes of the integer arrays in a calibration ``.npz`` (token ids, masks): how to type the inputs of
    a PyTorch model whose signature does not say. Anything unreadable yields {} (``load_data`` reports it later)."""
    if not spec or not str(spec).endswith(".npz"):
        return {}
    found = {}
    try:
        with zipfile.ZipFile(spec) as z:  # only each member's .npy header: no array is decompressed in full
            for member in z.namelist():
                if not member.endswith(".npy") or member[:-4] == LABELS_KEY:
                    continue
                with z.open(member) as f:
                    major, _ = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                    _, _, dtype = read(f)
                if str(dtype) in ("int64", "int32"):
                    found[member[:-4]] = str(dtype)
    except (OSError, ValueError, zipfile.BadZipFile):
        return {}
    return found
