"""The build pipeline: the only module that knows the order of the stages.

load model → load data → export FP32 → inventory → plan → apply → verify → measure → bundle (+ signature) → report
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from edgekit import __version__
from edgekit.allocate import uniform_plan
from edgekit.compress.quant import DYNAMIC_SETTINGS, W8A8Config
from edgekit.context import Context
from edgekit.data import Dataset, integer_inputs, load_data
from edgekit.errors import ConfigError, UnsupportedOnTarget, VerificationFailed
from edgekit.export.onnx import describe, export_onnx
from edgekit.fsutil import check_file_name, make_dirs, remove_empty, staging_dir
from edgekit.inventory import LayerInfo, layer_inventory
from edgekit.iospec import Artifact
from edgekit.mixed import allocate as allocate_mixed
from edgekit.mixed import apply_plan, search_max_drop
from edgekit.model import LoadedModel, load_model
from edgekit.plan import PRECISIONS, Plan, parse_option, tolerance_class
from edgekit.tables import Budget
from edgekit.targets import TargetProfile, load_target
from edgekit.tensorrt_artifact import TrtGraph, apply_plan_tensorrt, bundle_form, engine_section, preflight_source
from edgekit.verify import VerificationReport, require_pass, run_reference, verify_artifact
from edgekit.zoo import DEFAULT_MODEL

log = logging.getLogger(__name__)

ARTIFACT_NAME = "model.onnx"
EXPORTERS = ("onnxruntime", "tensorrt", "tflite")  # runtimes this build exports for
TASKS = ("classification", "embedding", "generic")  # classification adds top-1 agreement and accuracy


@dataclass(frozen=True)
class BuildRequest:
    """Everything ``edgekit build`` takes. Defaults build the built-in EfficientNet-Lite0 for cpu-x86."""

    model: str = DEFAULT_MODEL
    target: str = "cpu-x86"
    out: Path = Path("out")
    input_shapes: tuple[tuple[int, ...], ...] | None = None
    calib: str | None = None
    eval: str | None = None
    precision: str = "auto"
    key: Path | None = None
    allow_unverified: bool = False
    bundle_version: int | None = None
    name: str | None = None
    calib_samples: int = 64
    eval_samples: int | None = None
    measure_latency: bool = True
    plan: Path | None = None  # replay this plan (``edgekit apply``) instead of making one
    budget: Budget | None = None  # allocate per layer under this budget (sensitivity x cost -> solver)
    task: str | None = None  # classification | embedding | generic; None: as guessed from the model
    max_drop: float | None = None  # accuracy budget: the most compressed plan whose verified drop is within this
    solver: str = "auto"
    space: str = "bits"  # the --budget option space: "bits" (precision per layer) or "joint" (+ pruning, rank, drop)
    recover_steps: int = 0  # --recover: distillation steps after structural changes (joint space)
    channel_importance: str = "activations"  # --channel-importance: how pruning ranks channels (joint space)


@dataclass(frozen=True)
class Candidate:
    """One plan tried: the plan, its artifact and verification, and the tables it was allocated from."""

    plan: Plan
    artifact: Artifact
    verification: VerificationReport
    analysis: dict | None = None
    trt: TrtGraph | None = None  # TensorRT targets: the TensorRT-ready graph behind the artifact


@dataclass(frozen=True)
class BuildResult:
    bundle_dir: Path
    archive: Path
    plan: Plan
    verification: VerificationReport
    manifest: dict
    report: dict
    tried: tuple[dict, ...] = field(default_factory=tuple)


def _load_datasets(model: LoadedModel, req: BuildRequest, ctx: Context) -> tuple[Dataset, Dataset]:
    if req.calib == "none":
        return _data_free(model, req, ctx)
    calib_spec = req.calib or model.default_calib
    if calib_spec is None:
        raise ConfigError(
            f"{model.source} has no built-in calibration data",
            hint="pass --calib FILE.npz|FILE.npy|IMAGE_FOLDER (and --eval for held-out data)",
        )
    tensors = calib_spec.endswith((".npy", ".npz")) or calib_spec.startswith("builtin:")
    if model.preprocessing is None and not tensors:
        raise ConfigError("image folders need the model's preprocessing, which is only known for built-in models",
                          hint="pass the data as .npy/.npz tensors in the model's input layout")
    calib = load_data(calib_spec, model.inputs, model.preprocessing, role="calibration", limit=req.calib_samples,
                      seed=ctx.seed)
    eval_spec = req.eval or model.default_eval
    if eval_spec is not None:
        ev = load_data(eval_spec, model.inputs, model.preprocessing, role="evaluation", limit=req.eval_samples,
                       seed=ctx.seed)
        return calib, ev
    # no held-out set named: hold out the last quarter of the calibration data
    if len(calib) < 2:
        log.warning("only one calibration sample and no --eval: verifying on the calibration sample itself")
        return calib, calib
    n_eval = max(1, len(calib) // 4)
    log.info("no --eval given: holding out %d of %d calibration samples for verification", n_eval, len(calib))
    return _slice(calib, 0, len(calib) - n_eval), _slice(calib, len(calib) - n_eval, len(calib))


def _data_free(model: LoadedModel, req: BuildRequest, ctx: Context) -> tuple[Dataset, Dataset]:
    """``--calib none``: synthesize calibration inputs from BatchNorm statistics; verify on real held-out data."""
    from edgekit.datafree import synthesize

    eval_spec = req.eval or model.default_eval
    if eval_spec is None:
        raise ConfigError("--calib none still needs real held-out data to verify the result", hint="pass --eval DATA")
    if model.module is None:
        raise ConfigError("data-free calibration needs the PyTorch model (its BatchNorm statistics); ONNX models "
                          "have them folded away", hint="pass --calib with real samples")
    log.warning("calibrating without data (synthesized from BatchNorm statistics); the report records this")
    n = min(req.calib_samples, 32)
    if req.calib_samples > n:
        log.info("data-free calibration synthesizes %d inputs (at most 32)", n)
    calib = synthesize(model.module, model.inputs, n=n, seed=ctx.seed, track=ctx.track)
    ev = load_data(eval_spec, model.inputs, model.preprocessing, role="evaluation", limit=req.eval_samples,
                   seed=ctx.seed)
    return calib, ev


def _slice(d: Dataset, a: int, b: int) -> Dataset:
    return replace(d.subset(slice(a, b)), source=f"{d.source}[{a}:{b}]")


def _candidates(precision: str, profile: TargetProfile) -> list[str]:
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}", hint=f"choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return [precision]
    # smallest first; the first that passes verification wins. Static int8 (fastest on CPUs) before dynamic int8,
    # which transformers tolerate where calibrated per-tensor activation scales break them.
    options = {"int8": "w8a8", "int8-dynamic": "w8a8d"}
    return [p for p in ("int8", "int8-dynamic", "fp32")
            if p == "fp32" or any(profile.supports(k, options[p]) for k in profile.ops)]


def build(req: BuildRequest, ctx: Context) -> BuildResult:
    """Run the whole pipeline and write ``<out>/<name>/`` (bundle directory) and ``<out>/<name>.ekb``."""
    t_start = time.time()
    profile = load_target(req.target)  # fail on a bad target before any heavy work
    if req.plan is None:
        _candidates(req.precision, profile)  # a bad --precision fails before any heavy work
    if req.max_drop is not None and req.budget is not None and not req.budget.is_empty():
        raise ConfigError("give either --max-drop or --budget, not both")
    if req.max_drop is not None and req.precision != "auto":
        raise ConfigError("--max-drop chooses the precision per layer itself; leave --precision at auto")
    if not set(profile.runtimes) & set(EXPORTERS):
        raise UnsupportedOnTarget(
            f"target {profile.name} runs {profile.runtimes}; this build exports {', '.join(EXPORTERS)} only"
        )
    signing_key = _signing_key(req, ctx)
    log.info("loading model %s", req.model)
    model = load_model(req.model, input_shapes=list(req.input_shapes) if req.input_shapes else None,
                       input_dtypes=integer_inputs(req.calib), ctx=ctx)
    if req.task is not None:
        if req.task not in TASKS:
            raise ConfigError(f"unknown task {req.task!r}", hint=f"one of {', '.join(TASKS)}")
        model = replace(model, task=req.task)
    runtime = _export_runtime(profile, model)
    calib, evald = _load_datasets(model, req, ctx)
    name = check_file_name(req.name or model.name, "bundle name")
    out_root = Path(req.out)
    created = make_dirs(out_root)
    try:
        return _build_into(out_root, name, req, profile, model, runtime, calib, evald, signing_key, t_start, ctx)
    except BaseException:
        remove_empty(created)  # a failed build leaves no empty OUT behind
        raise


def _build_into(out_root: Path, name: str, req: BuildRequest, profile: TargetProfile, model: LoadedModel,
                runtime: str, calib, evald, signing_key, t_start: float, ctx: Context) -> BuildResult:
    """The part of ``build`` that works in ``out_root``: choose, verify and write the bundle."""
    cfg = W8A8Config(calib_samples=req.calib_samples)
    if req.plan is not None:  # a replayed plan brings its quantizer settings
        recorded = Plan.load(req.plan).activations
        if recorded:
            cfg = W8A8Config.from_dict(recorded)
    with tempfile.TemporaryDirectory(prefix=".edgekit-work-", dir=out_root) as tmp:
        work = Path(tmp)
        log.info("exporting %s to ONNX", model.source)
        fp32 = export_onnx(model, work / "model-fp32.onnx")
        if runtime == "tensorrt":  # an op TensorRT cannot parse fails now, before any compression work
            preflight_source(fp32, profile)
        layers = layer_inventory(fp32.path)
        reference = run_reference(model, evald, ctx)
        chosen, tried = _choose(req, profile, model, fp32, layers, calib, evald, reference, work, cfg, ctx,
                                runtime=runtime)
        # the host's speed of a TensorRT engine (it has none) or of a TFLite model (x86 XNNPACK) says nothing of the
        # target's: those are measured on the device
        latency = _latency(fp32, chosen.artifact, evald) if req.measure_latency and runtime == "onnxruntime" else {}
        report = _report(req, profile, model, layers, fp32, chosen, tried, latency, calib, evald, t_start)
        bundle_dir = out_root / name
        archive = out_root / f"{name}.ekb"
        from edgekit.bundle import pack

        packed = work / archive.name
        with staging_dir(bundle_dir) as stage:  # nothing appears in OUT unless every step succeeds
            manifest = _write_bundle(stage, req, profile, model, name, chosen, report, signing_key, calib, evald)
            pack(stage, packed)
        os.replace(packed, archive)
    log.info("bundle written: %s and %s", bundle_dir, archive)
    return BuildResult(bundle_dir, archive, chosen.plan, chosen.verification, manifest, report, tuple(tried))


def check_plan(plan: Plan, layers: list[LayerInfo], profile: TargetProfile, model: LoadedModel) -> Plan:
    """A replayed plan must name exactly this model's layers, with options the target supports."""
    names = [layer.name for layer in layers]
    planned = [c.layer for c in plan.layers]
    if sorted(planned) != sorted(names):
        missing, extra = sorted(set(names) - set(planned)), sorted(set(planned) - set(names))
        raise ConfigError(
            f"the plan does not fit this model: layers missing from the plan {missing[:5]}, unknown {extra[:5]}",
            hint="make a plan for this model with `edgekit build`, then edit its plan.json",
        )
    if plan.model_sha256 != model.sha256:
        log.warning("the plan was made for another version of the model (sha256 %s…, this one %s…)",
                    plan.model_sha256[:12], model.sha256[:12])
    kinds = {layer.name: layer.kind for layer in layers}
    for c in plan.layers:
        parts = parse_option(c.option)
        scheme = parts.base if parts.sparsity is None else f"{parts.sparsity}+{parts.base}"
        if parts.base not in ("fp32", "drop") and not profile.supports(kinds[c.layer], scheme):
            raise UnsupportedOnTarget(f"the plan asks {c.option} for layer {c.layer!r} ({kinds[c.layer]}), "
                                      f"which target {profile.name} does not support")
    return plan


def _proposals(req, profile, model, layers, cfg, allocate, search):
    """Plans to try, most compressed first, made lazily: (label, make) where make() -> (plan, analysis)."""
    if req.plan is not None:
        yield "plan", lambda: (check_plan(Plan.load(req.plan), layers, profile, model), None)
        return
    if req.max_drop is not None:
        yield "max-drop", search
        return
    if req.budget is not None and not req.budget.is_empty():
        yield "allocated", allocate
        return
    for precision in _candidates(req.precision, profile):
        def make(precision=precision):
            settings = {"fp32": {}, "int8-dynamic": DYNAMIC_SETTINGS}.get(precision, cfg.to_dict())
            return uniform_plan(layers, profile, precision, model_sha256=model.sha256, activations=settings), None
        yield precision, make


def _export_runtime(profile: TargetProfile, model: LoadedModel) -> str:
    """The runtime this build exports for: the profile's first that edgekit exports and the model can go to (TFLite
    converts PyTorch modules only; an ONNX model goes to the profile's next runtime)."""
    for runtime in profile.runtimes:
        if runtime not in EXPORTERS:
            continue
        if runtime == "tflite" and model.module is None:
            log.warning("TFLite export converts PyTorch models and %s is ONNX: building for the target's next runtime",
                        model.source)
            continue
        if runtime != profile.runtime:
            log.info("target %s prefers %s; building for %s", profile.name, profile.runtime, runtime)
        return runtime
    raise UnsupportedOnTarget(f"no runtime of target {profile.name} ({', '.join(profile.runtimes)}) can take "
                              f"{model.source}", hint="give a PyTorch model (TFLite export converts torch modules)")


def _choose(req, profile, model, fp32, layers, calib, evald, reference, work, cfg, ctx,
            *, runtime: str = "onnxruntime") -> tuple[Candidate, list[dict]]:
    tried: list[dict] = []
    last: Candidate | None = None
    def allocate():
        if req.space == "joint":
            from edgekit.joint import allocate_joint

            return allocate_joint(budget=req.budget, solver=req.solver, profile=profile, model=model, fp32=fp32,
                                  layers=layers, calib=calib, work=work, cfg=cfg, ctx=ctx,
                                  recover_steps=req.recover_steps, importance=req.channel_importance)
        return allocate_mixed(budget=req.budget, solver=req.solver, profile=profile, model=model, fp32=fp32,
                              layers=layers, calib=calib, work=work, cfg=cfg, ctx=ctx)

    def search():
        return search_max_drop(max_drop=req.max_drop, profile=profile, model=model, fp32=fp32, layers=layers,
                               calib=calib, evald=evald, reference=reference, work=work, cfg=cfg, ctx=ctx)

    for label, make_plan in _proposals(req, profile, model, layers, cfg, allocate, search):
        try:
            plan, analysis = make_plan()
        except UnsupportedOnTarget:
            if req.precision != "auto" or label in ("plan", "allocated", "max-drop"):
                raise
            continue
        log.info("applying %s plan (%d of %d layers quantized)", label,
                 sum(c.option != "fp32" for c in plan.layers), len(plan.layers))
        made = (analysis or {}).pop("applied", None)  # (plan layers, artifact) already built while allocating
        trt = None
        if runtime == "tensorrt":
            artifact, trt = apply_plan_tensorrt(plan, fp32, calib, work / f"model-{plan.precision}.trt.onnx",
                                                profile, ctx)
        elif runtime == "tflite":
            from edgekit.export.tflite import export_tflite

            artifact = export_tflite(model.module, model.inputs, model.output_names,
                                     work / f"model-{plan.precision}.tflite", plan=plan, calib=calib, ctx=ctx)
        elif made and made[0] == plan.layers:
            artifact = made[1]
        else:
            artifact = apply_plan(plan, fp32, calib, work / f"model-{plan.precision}.onnx", cfg, ctx)
        tol_class = tolerance_class(plan)
        report = verify_artifact(artifact, evald, reference, tolerances=profile.tolerance_for(tol_class),
                                 tolerance_class=tol_class, classification=model.task == "classification", ctx=ctx)
        log.info("%s: %s", label, report.summary())
        tried.append({"precision": label, "size_bytes": artifact.size, "verification": report.summary(),
                      "passed": report.passed})
        last = Candidate(plan, artifact, report, analysis, trt)
        if report.passed:
            return last, tried
    if last is None:
        raise UnsupportedOnTarget(f"no precision of {req.precision!r} is supported by target {profile.name}")
    if req.allow_unverified:
        log.warning("verification failed (%s); bundling anyway because --allow-unverified was given",
                    "; ".join(last.verification.failures))
        return last, tried
    require_pass(last.verification)
    raise VerificationFailed("unreachable")  # pragma: no cover


def _latency(fp32: Artifact, chosen: Artifact, evald: Dataset) -> dict:
    from edgekit.agent.runtime import OrtRuntime, compare_latency

    feeds = {k: v[:1] for k, v in evald.inputs.items()}
    runtimes = {"fp32": OrtRuntime(fp32.path)}
    if chosen.path != fp32.path:
        runtimes["chosen"] = OrtRuntime(chosen.path)
    stats = compare_latency(runtimes, feeds)
    result = {"batch": 1, "host": _host(), "fp32": stats["fp32"].to_dict()}
    if "chosen" in stats:
        result["chosen"] = stats["chosen"].to_dict()
        result["ratio"] = round(stats["chosen"].median_ms / stats["fp32"].median_ms, 4)
    else:
        result["chosen"] = result["fp32"]
        result["ratio"] = 1.0
    return result


def _host() -> str:
    import os
    import platform

    return f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".replace("  ", " ")


def _signing_key(req: BuildRequest, ctx: Context):
    from edgekit.keys import dev_key, load_private_key

    path = req.key if req.key is not None else dev_key(ctx.cache_dir)
    return load_private_key(path)


def _dependency_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"edgekit": __version__}
    for pkg in ("torch", "onnx", "onnxruntime", "onnxscript", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _report(req, profile, model, layers: list[LayerInfo], fp32, chosen: Candidate, tried, latency, calib, evald,
            t_start) -> dict:
    plan = chosen.plan
    options = {c.layer: (c.option, c.reason) for c in plan.layers}
    pq = _pq_indices(fp32.path, layers)
    layer_rows = [dict(l.to_dict(), option=options[l.name][0], reason=options[l.name][1],
                       compression=parse_option(options[l.name][0]).kind, pq_index=pq.get(l.name)) for l in layers]
    budgets = profile.budgets.model_dump()  # the target's defaults, unless the user gave --budget
    asked = req.budget.to_dict() if req.budget is not None else {}
    if "size_bytes" in asked:
        budgets["size_mb"] = asked["size_bytes"] / 1e6
    if "latency_ms" in asked:
        budgets["latency_ms"] = asked["latency_ms"]
    if "latency_ratio" in asked and latency:
        budgets["latency_ms"] = round(asked["latency_ratio"] * latency["fp32"]["median_ms"], 4)
    size = chosen.artifact.size
    budget_check = {}
    if budgets.get("size_mb") is not None:
        budget_check["size"] = {"budget_mb": budgets["size_mb"], "actual_mb": round(size / 1e6, 3),
                                "met": size / 1e6 <= budgets["size_mb"]}
    if budgets.get("latency_ms") is not None and latency:
        budget_check["latency"] = {"budget_ms": budgets["latency_ms"], "actual_ms": latency["chosen"]["median_ms"],
                                   "met": latency["chosen"]["median_ms"] <= budgets["latency_ms"],
                                   "note": "measured on the build host, not on the target"}
    allocation = None
    if chosen.analysis is not None:
        sens = chosen.analysis["sensitivity"]
        cost = chosen.analysis["cost"]["entries"]
        for row in layer_rows:
            name = row["name"]
            row["distortion"] = sens["values"].get(name, {}).get(row["option"])
            if cost:  # --max-drop searches by verification, without a cost table
                entry = cost.get(name, {}).get(row["option"], {})
                row["bytes"], row["latency_ms"], row["latency_source"] = (
                    entry.get("bytes"), entry.get("latency_ms"), entry.get("source"))
        allocation = {"solver": plan.solver, "budget": plan.budget, "metric": sens["metric"],
                      "latency_rounds": chosen.analysis.get("latency_rounds", []),
                      "additivity": sens["additivity"], "hardware_table": chosen.analysis["hardware_table"],
                      "fp32_ms_at_build": chosen.analysis.get("fp32_ms"), "sensitivity": sens["values"],
                      "cost": cost, "pareto": chosen.analysis.get("pareto") or {},
                      "kept_because": chosen.analysis.get("kept_because")}
    return {
        "schema_version": 1,
        "model": {"source": model.source, "sha256": model.sha256, "framework": model.framework, "task": model.task,
                  "inputs": [s.to_dict() for s in model.inputs]},
        "target": {"name": profile.name, "runtime": "onnxruntime", "description": profile.description},
        "data": {"calibration": {"source": calib.source, "samples": len(calib), "sha256": calib.sha256()},
                 "evaluation": {"source": evald.source, "samples": len(evald), "sha256": evald.sha256()}},
        "precision": {"requested": req.precision, "chosen": plan.precision, "tried": tried},
        "layers": layer_rows,
        "allocation": allocation,
        "structure": _structure(chosen.artifact),
        "totals": {"layers": len(layers), "params": sum(l.params for l in layers), "macs": sum(l.macs for l in layers),
                   "quantized_layers": sum(c.option != "fp32" for c in plan.layers)},
        "size": {"fp32_bytes": fp32.size, "artifact_bytes": size, "ratio": round(size / fp32.size, 4)},
        "latency": latency,
        "budgets": budget_check,
        "verification": chosen.verification.to_dict(),
        "build_seconds": round(time.time() - t_start, 1),
        "versions": _dependency_versions(),
    }


def _structure(artifact) -> dict | None:
    """What the plan's structural half did (channels kept per group, branches dropped, factorized layers, the recovery
    fine-tune's loss before and after), as ``apply_plan`` recorded it; None for plans without structure."""
    import json

    from edgekit.mixed import structure_summary_path

    path = structure_summary_path(Path(artifact.path))
    return json.loads(path.read_text()) if path.is_file() else None


def _pq_indices(fp32_path, layers: list[LayerInfo]) -> dict[str, float]:
    """Per layer, the PQ Index of its FP32 weight (``compress.sparsity.pq_index``): how much pruning headroom it has."""
    import onnx
    from onnx import numpy_helper

    from edgekit.compress.sparsity import pq_index

    inits = {i.name: i for i in onnx.load(str(fp32_path)).graph.initializer}
    return {layer.name: round(pq_index(numpy_helper.to_array(inits[layer.weight])), 4) for layer in layers
            if layer.weight in inits}


def _reference(stage: Path, model: LoadedModel, chosen: Candidate, calib: Dataset, evald: Dataset) -> dict:
    """The agent's reference: score sketch on held-out data, and the adaptable normalization layers."""
    from edgekit import reference
    from edgekit.model import batch_size, example_inputs

    bs = batch_size(chosen.artifact.inputs, 32)
    doc = reference.sketch(chosen.artifact.path, evald, model.task, bs)
    # norm adaptation rewrites ONNX initializers: TFLite artifacts have none to rewrite
    onnx_graph = chosen.artifact.format != "tflite"
    convs = (reference.norm_convs(model.module, example_inputs(model.inputs))
             if model.module is not None and onnx_graph else [])
    layers = reference.adapt_table(chosen.artifact.path, convs, calib, bs)
    return reference.write(stage, doc, layers, len(calib))


def _write_bundle(stage: Path, req: BuildRequest, profile, model: LoadedModel, name: str, chosen: Candidate,
                  report: dict, signing_key, calib: Dataset, evald: Dataset) -> dict:
    from edgekit.bundle import seal
    from edgekit.report import write_report

    if chosen.trt is not None:
        artifact = bundle_form(chosen.trt, stage / ARTIFACT_NAME)
    elif chosen.artifact.format == "tflite":
        shutil.copyfile(chosen.artifact.path, stage / "model.tflite")
        artifact = replace(chosen.artifact, path=stage / "model.tflite")
    else:
        shutil.copyfile(chosen.artifact.path, stage / ARTIFACT_NAME)
        artifact = describe(stage / ARTIFACT_NAME)
    chosen.plan.save(stage / "plan.json")
    chosen.verification.save(stage / "verification.json")
    write_report(report, stage)
    refs = _reference(stage, model, chosen, calib, evald)
    manifest = {
        "name": name,
        "version": req.bundle_version if req.bundle_version is not None else int(time.time()),
        "target": profile.name,
        "runtime": artifact.runtime,
        "artifact": artifact.to_dict(),
        "inputs": [s.to_dict() for s in artifact.inputs],
        "outputs": [s.to_dict() for s in artifact.outputs],
        "preprocessing": model.preprocessing.to_dict() if model.preprocessing else None,
        "task": model.task,
        "plan": chosen.plan.to_dict(),
        "reference": refs,
        "verification": {"passed": chosen.verification.passed, "summary": chosen.verification.summary(),
                         "failures": list(chosen.verification.failures), "file": "verification.json"},
        "lineage": {"source_model": model.source, "source_sha256": model.sha256,
                    "calibration_sha256": report["data"]["calibration"]["sha256"],
                    "evaluation_sha256": report["data"]["evaluation"]["sha256"],
                    "versions": report["versions"]},
    }
    if chosen.trt is not None:
        manifest["engine"] = engine_section(chosen.trt, profile)
    return seal(stage, manifest, signing_key)
