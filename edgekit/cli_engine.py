"""``edgekit engine ...``: TensorRT engines on the device, from a bundle built for a TensorRT target (no torch)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click

_CACHE = click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
                      default=Path.home() / ".cache" / "edgekit" / "engines", show_default=True,
                      help="Where engines and the device's timing cache are kept.")


@click.group()
def engine() -> None:
    """TensorRT engines: built on the device (engines are specific to the GPU and the TensorRT version)."""


def _open(bundle: Path, pubkeys, workdir: Path):
    from edgekit.bundle import open_bundle
    from edgekit.keys import load_public_key

    keys = [load_public_key(p) for p in pubkeys] or None
    return open_bundle(bundle, trusted_keys=keys, workdir=workdir / "bundle")


@engine.command("info")
@click.argument("bundle", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def engine_info(bundle: Path, as_json: bool) -> None:
    """Show how BUNDLE's engine will be built: TensorRT version, flags, layers per precision, plugins."""
    from edgekit.agent.engine import EngineSpec

    with tempfile.TemporaryDirectory(prefix="edgekit-engine-") as tmp:
        opened = _open(bundle, (), Path(tmp))
        spec = EngineSpec.from_manifest(opened.manifest)
        section = opened.manifest["engine"]
    if as_json:
        click.echo(json.dumps(section, indent=2))
        return
    layers = section.get("layers", {})
    click.echo(f"TensorRT {spec.tensorrt_version} (sm {section.get('sm')}), flags: "
               + ", ".join(k for k, v in spec.flags().items() if v and k != "refit"))
    click.echo("  layers: " + ", ".join(f"{len(v)} {k}" for k, v in layers.items()))
    click.echo(f"  plugins: {', '.join(section.get('plugins') or []) or 'none'}; "
               f"refittable weights: {len(spec.refittable)}")


@engine.command("build")
@click.argument("bundle", type=click.Path(exists=True, path_type=Path))
@_CACHE
@click.option("--pubkey", "pubkeys", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Trusted public key (repeatable); the bundle must be signed by one.")
@click.option("--refit", is_flag=True, help="Build a refittable engine (REFIT_INDIVIDUAL on the bundle's norm/bias "
              "weights), so adaptation updates refit it instead of rebuilding.")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Largest batch of the optimization profile (dynamic-batch graphs).")
@click.option("--plugin-lib", "plugin_libs", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="edgekit's TensorRT plugin library (runtimes/tensorrt), when the graph uses plugins.")
@click.option("--force", is_flag=True, help="Build even when the cache holds this engine.")
@click.option("--json", "as_json", is_flag=True)
def engine_build(bundle: Path, cache_dir: Path, pubkeys, refit: bool, max_batch: int, plugin_libs, force: bool,
                 as_json: bool) -> None:
    """Build (or find in the cache) the TensorRT engine of BUNDLE for this device's GPU and TensorRT."""
    from edgekit.agent.engine import EngineSpec, build_engine

    with tempfile.TemporaryDirectory(prefix="edgekit-engine-") as tmp:
        opened = _open(bundle, pubkeys, Path(tmp))
        spec = EngineSpec.from_manifest(opened.manifest, refit=refit, max_batch=max_batch)
        art = opened.manifest["artifact"]
        result = build_engine(opened.path(art["path"]), spec, cache_dir, plugin_libraries=list(plugin_libs),
                              force=force)
    if as_json:
        click.echo(json.dumps({"engine": str(result.path), "key": result.key, "cached": result.cached,
                               "timing_cache": str(result.timing_cache), "seconds": result.seconds}, indent=2))
    else:
        how = "found in the cache" if result.cached else f"built in {result.seconds:.1f} s"
        click.echo(f"engine {result.path} ({how})")
