"""Re-verify a shipped bundle: check its hashes and signature, run its artifact on data, compare with the original.

The original model is the one given, else the bundle's source model when it can be found again (a built-in, an
existing file, or an importable factory).
"""

from __future__ import annotations

import logging
from pathlib import Path

from edgekit.bundle import open_bundle
from edgekit.context import Context
from edgekit.data import load_data
from edgekit.errors import ConfigError, EdgekitError
from edgekit.iospec import Artifact, Preprocessing, TensorSpec
from edgekit.model import load_model, with_preprocessing
from edgekit.plan import Plan, tolerance_class
from edgekit.targets import Tolerances, load_target
from edgekit.verify import VerificationReport, run_reference, verify_artifact

log = logging.getLogger(__name__)


def _tolerances(manifest: dict, opened, tol_class: str) -> Tolerances:
    try:
        return load_target(manifest["target"]).tolerance_for(tol_class)
    except EdgekitError:
        import json

        log.info("target %s is not known here; using the tolerances recorded in the bundle", manifest.get("target"))
        recorded = json.loads(opened.path("verification.json").read_text())["tolerances"]
        return Tolerances(**recorded)


def verify_bundle(
    bundle: Path, data: str, *, model: str | None, input_shapes, trusted_keys, workdir: Path, limit: int | None,
    ctx: Context,
) -> VerificationReport:
    opened = open_bundle(Path(bundle), trusted_keys=trusted_keys, workdir=workdir)
    m = opened.manifest
    art = m["artifact"]
    artifact = Artifact(
        path=opened.path(art["path"]), format=art["format"], sha256=art["sha256"],
        inputs=tuple(TensorSpec.from_dict(t) for t in m["inputs"]),
        outputs=tuple(TensorSpec.from_dict(t) for t in m["outputs"]), runtime=m["runtime"],
    )
    source = model or m.get("lineage", {}).get("source_model")
    if source is None:
        raise ConfigError("the bundle does not name its source model", hint="pass --model SPEC")
    shapes = input_shapes or [(1, *TensorSpec.from_dict(t).sample_shape) for t in m["inputs"]]
    try:
        original = load_model(source, input_shapes=shapes, ctx=ctx,
                              input_dtypes={t["name"]: t["dtype"] for t in m["inputs"]})
    except EdgekitError as exc:
        raise ConfigError(f"cannot load the original model {source!r} to compare with: {exc.message}",
                          hint="pass --model SPEC naming the original model") from exc
    pre = Preprocessing.from_dict(m["preprocessing"]) if m.get("preprocessing") else None
    original = with_preprocessing(original, pre)
    dataset = load_data(data, artifact.inputs, pre, role="evaluation", limit=limit, seed=ctx.seed)
    reference = run_reference(original, dataset, ctx)
    tol_class = tolerance_class(Plan.from_dict(m["plan"]))
    return verify_artifact(
        artifact, dataset, reference, tolerances=_tolerances(m, opened, tol_class), tolerance_class=tol_class,
        classification=m.get("task") == "classification", ctx=ctx,
    )
