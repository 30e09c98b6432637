"""``edgekit delta make``: ship a release as the tensors that changed against a base release (no torch)."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group()
def delta() -> None:
    """Deltas: a release as the tensors that changed against the base release devices run."""


@delta.command("make")
@click.argument("base", type=click.Path(exists=True, path_type=Path))
@click.argument("new", type=click.Path(exists=True, path_type=Path))
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), default=Path("out/delta"),
              show_default=True, help="Where the result bundle (.ekb and folder) and the delta (.ekd) go.")
@click.option("--error-bound", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=1e-3,
              show_default=True, help="Largest error per tensor, as a share of that tensor's largest magnitude.")
@click.option("--full", metavar="URL", help="Where devices whose model is not BASE fetch the full bundle instead.")
@click.option("--key", type=click.Path(dir_okay=False, path_type=Path),
              help="ed25519 private key to sign with (default: the per-user dev key).")
@click.option("--json", "as_json", is_flag=True)
def delta_make(base: Path, new: Path, out: Path, error_bound: float, full: str | None, key: Path | None,
               as_json: bool) -> None:
    """Encode NEW's changed tensors against BASE (bundles of the same graph) under an error bound per tensor.

    Writes the result bundle (NEW with the encoded changes applied to BASE's model: what every device ends up
    with) and the delta archive (.ekd), which carry the same signed manifest."""
    from edgekit.context import Context
    from edgekit.delta import make_delta
    from edgekit.keys import dev_key, load_private_key

    private = load_private_key(key if key is not None else dev_key(Context().cache_dir))
    res = make_delta(base, new, out, private, error_bound=error_bound, full=full)
    if as_json:
        click.echo(json.dumps({"bundle": str(res.bundle_dir), "archive": str(res.archive), "delta": str(res.delta),
                               **res.stats}, indent=2))
    else:
        click.echo(f"delta {res.delta}: {res.stats['tensors']} tensor(s), {res.stats['delta_bytes']} bytes "
                   f"({res.stats['ratio']:.2%} of the full bundle {res.archive})")
