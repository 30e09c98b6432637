"""The ``edgekit`` command: thin click commands that parse, call the library, and print a summary or ``--json``.

Exit codes: 0 success, 1 internal error, 2 usage error, 3+ one per error family (see edgekit.errors), 130 interrupt.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from edgekit import __version__
from edgekit.errors import ConfigError, EdgekitError

log = logging.getLogger("edgekit")

_NOISY = ("onnxscript", "onnx_ir", "torch.onnx", "onnxruntime", "root")


def _setup_logging(verbosity: int) -> None:
    from rich.logging import RichHandler

    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = RichHandler(console=_stderr(), show_time=False, show_path=verbosity > 0, markup=False)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("edgekit").setLevel(level)
    for name in _NOISY:  # third-party chatter only when asked for
        logging.getLogger(name).setLevel(logging.DEBUG if verbosity > 1 else logging.ERROR)
    import warnings

    if verbosity <= 1:
        warnings.filterwarnings("ignore")


def _stderr():
    from rich.console import Console

    return Console(stderr=True)


class _Group(click.Group):
    """Turns edgekit errors into a one-line message and the family's exit code; never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgekitError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: no output was written", err=True)
            ctx.exit(130)
        except BrokenPipeError:  # `edgekit ... | head`: the reader left; stop quietly
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(141)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except OSError as exc:  # a path the user gave cannot be read or written (parent is a file, no permission)
            if ctx.obj and ctx.obj.get("verbose", 0) > 0:
                raise
            where = f": {exc.filename}" if exc.filename else ""
            click.echo(f"error: {exc.strerror or exc}{where}", err=True)
            ctx.exit(ConfigError.exit_code)
        except Exception as exc:  # noqa: BLE001 - the last line of defence for users
            if ctx.obj and ctx.obj.get("verbose", 0) > 0:
                raise
            click.echo(f"internal error: {type(exc).__name__}: {exc}\n  (run with -v for the traceback; "
                       "please report it)", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgekit")
@click.option("-v", "--verbose", count=True, help="More log output (-vv includes third-party libraries).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """edgekit: compress a model per layer for an edge target, verify it, and ship it as a signed bundle.

    \b
    Quick start:
      edgekit build --target cpu-x86          # built-in EfficientNet-Lite0 on real photos
      edgekit inspect out/efficientnet-lite0.ekb
      edgekit targets                         # the target profiles
    """
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = -1 if quiet else verbose
    _setup_logging(-1 if quiet else verbose)


def _ctx(seed: int = 0):
    from edgekit.context import Context

    return Context(seed=seed, progress=sys.stderr.isatty() and logging.getLogger("edgekit").level <= logging.INFO)


def _emit_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


# ---------------------------------------------------------------------------------------------- build
_BUILD_OPTIONS = [
    click.option("--model", "-m", default="builtin:efficientnet-lite0", show_default=True,
                 help="builtin:NAME (efficientnet-lite0, digits-cnn, digits-bn), package.module:factory, FILE.pt2 or "
                      "FILE.onnx."),
    click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), default=Path("out"),
                 show_default=True, help="Output folder; the bundle is written to OUT/NAME/ and OUT/NAME.ekb."),
    click.option("--input-shape", "input_shapes", multiple=True, metavar="N,C,H,W",
                 help="Input shape (first dim is the batch); once per input. Needed for PyTorch factories."),
    click.option("--calib", metavar="DATA",
                 help="Calibration data: FILE.npy, FILE.npz, an image folder, builtin:NAME, or `none` for data-free "
                      "calibration (synthesized from BatchNorm statistics; needs --eval unless built in)."),
    click.option("--eval", "eval_", metavar="DATA", help="Held-out evaluation data (default: the model's built-in "
                 "set, else the last quarter of --calib)."),
    click.option("--key", type=click.Path(dir_okay=False, path_type=Path),
                 help="ed25519 private key to sign with (`edgekit keys generate`); default: a per-user dev key."),
    click.option("--allow-unverified", is_flag=True, help="Write the bundle even if verification fails (marked)."),
    click.option("--name", help="Bundle name (default: the model's name)."),
    click.option("--bundle-version", type=click.IntRange(min=0), help="Monotonic bundle version (default: UNIX time)."),
    click.option("--calib-samples", type=click.IntRange(min=1), default=64, show_default=True),
    click.option("--eval-samples", type=click.IntRange(min=1), help="Limit the evaluation samples."),
    click.option("--no-latency", is_flag=True, help="Skip the FP32-vs-compressed latency measurement."),
    click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Seed for built-in data crops."),
    click.option("--task", type=click.Choice(["auto", "classification", "embedding", "generic"]), default="auto",
                 show_default=True, help="What the output is: classifiers also get top-1 agreement and accuracy. "
                 "auto: a 2-D output with several columns is taken for class logits."),
    click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of text."),
]


def _build_options(f):
    for option in reversed(_BUILD_OPTIONS):
        f = option(f)
    return f


def _run_build(as_json: bool, seed: int, input_shapes, **fields) -> None:
    from edgekit.build import BuildRequest
    from edgekit.build import build as run_build
    from edgekit.model import parse_input_shape

    req = BuildRequest(input_shapes=tuple(parse_input_shape(s) for s in input_shapes) or None, **fields)
    result = run_build(req, _ctx(seed))
    r = result.report
    if as_json:
        _emit_json({
            "bundle": str(result.bundle_dir), "archive": str(result.archive),
            "report": str(result.bundle_dir / "report.html"), "target": r["target"]["name"],
            "precision": result.plan.precision, "verification": result.verification.to_dict(),
            "size": r["size"], "latency": r["latency"], "budgets": r["budgets"],
        })
        return
    v = result.verification
    click.echo(f"built {r['model']['source']} for {r['target']['name']}: {result.plan.precision} "
               f"({result.plan.solver})")
    click.echo(f"  verification: {v.summary()}")
    click.echo(f"  size:    {r['size']['fp32_bytes'] / 1e6:.2f} MB FP32 -> {r['size']['artifact_bytes'] / 1e6:.2f} MB "
               f"({r['size']['ratio']:.2f}x)")
    if r["latency"]:
        lat = r["latency"]
        click.echo(f"  latency: {lat['fp32']['median_ms']:.3f} ms FP32 -> {lat['chosen']['median_ms']:.3f} ms "
                   f"({lat['ratio']:.2f}x, batch 1, ONNX Runtime on this host)")
    click.echo(f"  bundle:  {result.archive}  (folder {result.bundle_dir})")
    click.echo(f"  report:  {result.bundle_dir / 'report.html'}")


def _fields(model, out, calib, eval_, key, allow_unverified, name, bundle_version, calib_samples, eval_samples,
            no_latency, task) -> dict:
    return dict(model=model, out=out, calib=calib, eval=eval_, key=key, allow_unverified=allow_unverified,
                name=name, bundle_version=bundle_version, calib_samples=calib_samples, eval_samples=eval_samples,
                measure_latency=not no_latency, task=None if task == "auto" else task)


@cli.command()
@click.option("--target", "-t", default="cpu-x86", show_default=True,
              help="Target profile name (see `edgekit targets`) or a path to a profile .toml.")
@click.option("--precision", type=click.Choice(["auto", "int8", "int8-dynamic", "fp32"]), default="auto",
              show_default=True,
              help="auto: the smallest precision the target supports that passes verification (int8, then "
                   "int8-dynamic for Linear/MatMul layers, then fp32).")
@click.option("--budget", "budgets", multiple=True, metavar="KEY=VALUE",
              help="Allocate per layer under a budget: size=1.6MB, latency=0.6x (of FP32, measured) or latency=4ms, "
                   "avg-bits=12 (repeatable). The solver picks each layer's option from measured sensitivity and the "
                   "target's cost table; the result is measured as a whole.")
@click.option("--max-drop", metavar="DROP",
              help="Accuracy budget: the most compressed plan (static INT8 layers, the rest FP32) whose verified drop "
                   "on held-out data stays within DROP (1% or 0.01): accuracy with labels, else top-1 agreement, "
                   "else cosine.")
@click.option("--solver", type=click.Choice(["auto", "ilp", "dp", "evo"]), default="auto", show_default=True,
              help="Solver for --budget: ilp (exact integer program), dp (multiple-choice knapsack), evo "
                   "(evolutionary, scored by the additive model), auto (ilp).")
@click.option("--space", type=click.Choice(["bits", "joint"]), default="bits", show_default=True,
              help="Option space for --budget: bits (a precision per layer) or joint (also structured channel "
                   "pruning, low rank and removal of residual blocks / attention or FFN sub-layers, each priced by "
                   "the target's measured cost).")
@click.option("--recover", "recover_steps", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
              help="With --space joint: N knowledge-distillation steps from the original model on the calibration "
                   "data after structural changes (0: off). The report shows the loss before and after.")
@click.option("--channel-importance", type=click.Choice(["activations", "batchnorm"]), default="activations",
              show_default=True,
              help="With --space joint: how channel pruning ranks channels. activations: their spread on the "
                   "calibration data (right when that data looks like deployment). batchnorm: the training "
                   "distribution's BatchNorm statistics, recorded when a PyTorch model is exported (for "
                   "calibration data unlike deployment; falls back to activations without BatchNorm).")
@_build_options
def build(target, precision, budgets, max_drop, solver, space, recover_steps, channel_importance, model, out,
          input_shapes, calib, eval_, key, allow_unverified, name, bundle_version, calib_samples, eval_samples,
          no_latency, seed, task, as_json) -> None:
    """Compress, export, verify and bundle a model for a target.

    \b
    Examples:
      edgekit build --target cpu-x86
      edgekit build --target cpu-x86 --budget latency=0.6x         # per-layer allocation, 0.6x FP32
      edgekit build --model builtin:digits-cnn --budget size=60KB
      edgekit build --model builtin:digits-cnn --max-drop 0.1%      # accuracy budget
      edgekit build --budget latency=0.4x --space joint --recover 200  # + pruning, low rank, removal
      edgekit build --model builtin:digits-cnn --precision int8
      edgekit build --model mypkg.models:make_net --input-shape 1,3,224,224 --calib calib.npz --out out/
      edgekit build --model model.onnx --calib calib.npy --precision int8
      edgekit build --model builtin:efficientnet-lite0 --calib my_photos/ --eval held_out_photos/
    """
    from edgekit.tables import parse_budget, parse_drop

    budget = parse_budget(budgets) if budgets else None
    drop = parse_drop(max_drop) if max_drop is not None else None
    if (space != "bits" or recover_steps) and not budget:
        raise ConfigError("--space joint and --recover choose options under a --budget",
                          hint="add e.g. --budget latency=0.4x")
    if solver != "auto" and not budget:
        raise ConfigError(f"--solver {solver} solves a --budget, and none was given", hint="add e.g. --budget size=2MB")
    if recover_steps and space != "joint":
        raise ConfigError("--recover repairs structural changes, which only --space joint makes")
    if channel_importance != "activations" and space != "joint":
        raise ConfigError("--channel-importance ranks channels for pruning, which only --space joint does")
    _run_build(as_json, seed, input_shapes, target=target, precision=precision, budget=budget, solver=solver,
               max_drop=drop, space=space, recover_steps=recover_steps, channel_importance=channel_importance,
               **_fields(model, out, calib, eval_, key, allow_unverified, name, bundle_version, calib_samples,
                         eval_samples, no_latency, task))


@cli.command()
@click.argument("plan_file", metavar="PLAN", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--target", "-t", help="Target profile (default: the one the plan was made for).")
@_build_options
def apply(plan_file, target, model, out, input_shapes, calib, eval_, key, allow_unverified, name, bundle_version,
          calib_samples, eval_samples, no_latency, seed, task, as_json) -> None:
    """Replay a plan (e.g. an edited plan.json): apply its per-layer choices, verify, and bundle.

    The plan must name exactly the model's layers (as `edgekit plan show` lists them), with options the target
    supports.

    \b
    Example:
      edgekit build --model builtin:digits-cnn --out out/
      # edit out/digits-cnn/plan.json: set some layers' "option" to "fp32"
      edgekit apply out/digits-cnn/plan.json --model builtin:digits-cnn --out out2/
    """
    from edgekit.plan import Plan

    plan = Plan.load(plan_file)
    _run_build(as_json, seed, input_shapes, target=target or plan.target, plan=plan_file,
               **_fields(model, out, calib, eval_, key, allow_unverified, name, bundle_version, calib_samples,
                         eval_samples, no_latency, task))


# ---------------------------------------------------------------------------------------------- targets
@cli.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def targets(ctx: click.Context, as_json: bool) -> None:
    """List target profiles (`edgekit targets show NAME` for one)."""
    if ctx.invoked_subcommand is not None:
        return
    from edgekit.targets import list_targets

    profiles = list_targets()
    if as_json:
        _emit_json([{"name": p.name, "runtimes": p.runtimes, "description": p.description} for p in profiles])
        return
    if not profiles:
        click.echo("no target profiles found (see EDGEKIT_TARGETS_DIR)", err=True)
        return
    width = max(len(p.name) for p in profiles)
    for p in profiles:
        click.echo(f"{p.name:<{width}}  {'/'.join(p.runtimes):<22}  {p.description}")


@targets.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def targets_show(name: str, as_json: bool) -> None:
    """Show one target profile: runtimes, supported schemes per op, hardware, budgets, tolerances."""
    from edgekit.targets import load_target

    p = load_target(name)
    data = p.model_dump(mode="json")
    if as_json:
        _emit_json(data)
        return
    click.echo(f"{p.name}: {p.description}")
    click.echo(f"  runtimes: {', '.join(p.runtimes)}")
    hw = p.hardware
    click.echo(f"  memory: {hw.memory_bytes / 2**30:.1f} GiB, bandwidth {hw.bandwidth_gbs} GB/s, "
               f"peak {', '.join(f'{k} {v:g} GOPS' for k, v in hw.peak_gops.items())}")
    for op, s in p.ops.items():
        click.echo(f"  {op}: float {s.float_types}, weight bits {s.weight_bits}, activation bits {s.activation_bits}, "
                   f"granularity {s.granularity}, sparsity {s.sparsity or 'none'}")
    click.echo(f"  budgets: {p.budgets.model_dump(exclude_none=True)}")
    for k, t in p.tolerances.items():
        click.echo(f"  tolerances[{k}]: {t.model_dump(exclude_none=True)}")


# ---------------------------------------------------------------------------------------------- bundles
def _trusted(pubkeys: tuple[Path, ...]):
    from edgekit.keys import load_public_key

    return [load_public_key(p) for p in pubkeys] or None


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--pubkey", "pubkeys", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Trusted public key(s); the signature must come from one of them.")
@click.option("--json", "as_json", is_flag=True)
def inspect(bundle: Path, pubkeys, as_json: bool) -> None:
    """Check a bundle's hashes and signature, and show its manifest, plan and verification."""
    import tempfile

    from edgekit.bundle import open_bundle

    with tempfile.TemporaryDirectory(prefix="edgekit-inspect-") as tmp:
        opened = open_bundle(bundle, trusted_keys=_trusted(pubkeys), workdir=Path(tmp) / "b")
        m = opened.manifest
        sig = opened.signature
        if as_json:
            _emit_json({"manifest": m, "signature": {"valid": sig.valid, "trusted": sig.trusted, "key_id": sig.key_id,
                                                     "detail": sig.detail}})
            return
        plan = m.get("plan", {})
        counts: dict[str, int] = {}
        for c in plan.get("layers", []):
            counts[c["option"]] = counts.get(c["option"], 0) + 1
        art = m.get("artifact", {})
        click.echo(f"{bundle}: {m.get('name')} v{m.get('version')} for {m.get('target')} ({m.get('runtime')})")
        click.echo(f"  signature: {sig.detail}")
        click.echo(f"  files:     {len(m.get('files', []))}, all hashes match")
        click.echo(f"  artifact:  {art.get('path')} {art.get('format')} {art.get('size', 0) / 1e6:.2f} MB "
                   f"sha256 {str(art.get('sha256'))[:16]}…")
        for t in m.get("inputs", []):
            click.echo(f"  input:     {t['name']} {t['shape']} {t['dtype']}")
        for t in m.get("outputs", []):
            click.echo(f"  output:    {t['name']} {t['shape']} {t['dtype']}")
        click.echo(f"  plan:      {plan.get('precision')} via {plan.get('solver')}: "
                   + ", ".join(f"{n} x {o}" for o, n in sorted(counts.items())))
        ver = m.get("verification", {})
        click.echo(f"  verified:  {ver.get('summary')}")
        lin = m.get("lineage", {})
        click.echo(f"  lineage:   {lin.get('source_model')} sha256 {str(lin.get('source_sha256'))[:16]}…")


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--data", required=True, metavar="DATA",
              help="Evaluation data: FILE.npy, FILE.npz, image folder, builtin:NAME.")
@click.option("--model", "-m", metavar="SPEC",
              help="The original model to compare with (default: the bundle's source model when it is a built-in).")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="N,C,H,W")
@click.option("--pubkey", "pubkeys", multiple=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--limit", type=click.IntRange(min=1), help="Use only the first LIMIT samples.")
@click.option("--json", "as_json", is_flag=True)
def verify(bundle: Path, data: str, model, input_shapes, pubkeys, limit, as_json: bool) -> None:
    """Check a bundle, run its artifact on DATA and compare it with the original model.

    Exits non-zero (8) when the comparison fails the target's tolerances.
    """
    import tempfile

    from edgekit.bundle_check import verify_bundle
    from edgekit.model import parse_input_shape

    with tempfile.TemporaryDirectory(prefix="edgekit-verify-") as tmp:
        report = verify_bundle(
            bundle, data, model=model, input_shapes=[parse_input_shape(s) for s in input_shapes] or None,
            trusted_keys=_trusted(pubkeys), workdir=Path(tmp) / "b", limit=limit, ctx=_ctx(),
        )
    if as_json:
        _emit_json(report.to_dict())
    else:
        click.echo(f"{bundle}: {report.summary()}")
        for f in report.failures:
            click.echo(f"  failed: {f}")
    if not report.passed:
        sys.exit(8)


# ---------------------------------------------------------------------------------------------- keys
@cli.group()
def keys() -> None:
    """Manage ed25519 signing keys."""


@keys.command("generate")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for the key pair.")
@click.option("--name", default="edgekit", show_default=True, help="File name stem: NAME.key and NAME.pub.")
@click.option("--force", is_flag=True, help="Overwrite an existing key pair.")
def keys_generate(out: Path, name: str, force: bool) -> None:
    """Generate a signing key pair (private key written with mode 0600)."""
    from edgekit.keys import generate_keypair, key_id, load_public_key

    priv, pub = generate_keypair(out, name=name, overwrite=force)
    click.echo(f"private key: {priv}\npublic key:  {pub}\nkey id:      {key_id(load_public_key(pub))}")


# ---------------------------------------------------------------------------------------------- hardware
@cli.group()
def hardware() -> None:
    """Measured latency tables of a target (hardware/<target>.json) that the cost model reads."""


@hardware.command("probe")
@click.argument("models", nargs=-1, required=True)
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Table to write, e.g. hardware/cpu-x86.json (the path a target profile names).")
@click.option("--options", default="fp32,w8a8", show_default=True, help="Options to time per layer.")
@click.option("--merge", is_flag=True, help="Add to the table at --out instead of replacing it.")
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--per-round", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), help="ONNX Runtime threads (default: ORT's).")
@click.option("--copies", type=click.IntRange(min=1), default=4, show_default=True,
              help="Copies of each layer per timed call (amortises per-call overhead).")
@click.option("--target", "target_name", help="Time each layer as this target's export runs it: a profile whose "
              "custom_op_domains name ai.edgekit (cpu-x86-edgekit) gets edgekit's int8 convolution and weight-only "
              "kernels (the native library must be built). Default: plain ONNX Runtime ops.")
def hardware_probe(models, out, options, merge, rounds, per_round, threads, copies, target_name) -> None:
    """Time every weighted layer of MODELS on this machine, once per option, into a hardware table.

    Run it on the target device (or a machine like it). Each distinct layer shape is timed once, as a one-layer
    model with its activation, FP32 and INT8 interleaved. Write the table the target profile names
    (hardware_table); a table holds one kind of kernels, so --merge refuses to mix targets with and without
    ai.edgekit ops.

    \b
    Example:
      edgekit hardware probe builtin:efficientnet-lite0 builtin:digits-cnn --out hardware/cpu-x86.json
      edgekit hardware probe builtin:efficientnet-lite0 --target cpu-x86-edgekit --out hardware/cpu-x86-edgekit.json
    """
    from edgekit.cost import HardwareTable
    from edgekit.probe import probe_models, write_hardware_table

    edgekit_ops = False
    if target_name:
        from edgekit.targets import load_target

        edgekit_ops = load_target(target_name).edgekit_kernels
    table = HardwareTable.load(out) if merge and out.exists() else None
    table = probe_models(list(models), [o.strip() for o in options.split(",") if o.strip()], ctx=_ctx(), table=table,
                         rounds=rounds, per_round=per_round, threads=threads, copies=copies, edgekit_ops=edgekit_ops)
    write_hardware_table(table, out)
    click.echo(f"wrote {out}: {len(table.entries)} layer signatures x {options}")


# ---------------------------------------------------------------------------------------------- plan
@cli.group()
def plan() -> None:
    """Read plans (per-layer choices)."""


@plan.command("show")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def plan_show(path: Path, as_json: bool) -> None:
    """Show a plan.json (or the plan inside a bundle folder)."""
    from edgekit.plan import Plan

    p = Plan.load(path / "plan.json" if path.is_dir() else path)
    if as_json:
        _emit_json(p.to_dict())
        return
    click.echo(f"plan v{p.version} for {p.target}: {p.precision} via {p.solver}, {len(p.layers)} layers")
    width = max((len(c.layer) for c in p.layers), default=5)
    for c in p.layers:
        click.echo(f"  {c.layer:<{width}}  {c.option:<6}  {c.reason}")


def _register() -> None:
    from edgekit.cli_agent import agent
    from edgekit.cli_delta import delta
    from edgekit.cli_engine import engine
    from edgekit.cli_sync import sync

    cli.add_command(agent)
    cli.add_command(delta)
    cli.add_command(engine)
    cli.add_command(sync)


_register()


def main() -> None:
    cli(prog_name="edgekit")


if __name__ == "__main__":
    main()
