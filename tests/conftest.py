"""Shared fixtures: an isolated edgekit cache for the whole session, an in-process CLI runner and the native library."""

from __future__ import annotations

import contextlib
import logging
import os
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent


@pytest.fixture(scope="session", autouse=True)
def edgekit_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """EDGEKIT_CACHE points at one folder for the session: digits-cnn trains once, and ~/.cache is never touched."""
    path = tmp_path_factory.mktemp("edgekit-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEKIT_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def test_models_importable() -> Iterator[None]:
    """Put tests/ on sys.path so that ``--model fixtures_models:tiny_cnn`` resolves (restored afterwards)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(TESTS_DIR))
        yield


@contextlib.contextmanager
def _preserved_logging() -> Iterator[None]:
    """The CLI configures logging globally (root handlers, levels); put everything back after each invocation."""
    root = logging.getLogger()
    handlers, root_level = root.handlers[:], root.level
    manager = logging.Logger.manager
    levels = {n: lg.level for n, lg in manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    try:
        with warnings.catch_warnings():
            yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(root_level)
        for name, lg in list(manager.loggerDict.items()):
            if isinstance(lg, logging.Logger):
                lg.setLevel(levels.get(name, logging.NOTSET))


def _describe(result) -> str:
    text = f"exit code {result.exit_code}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    if result.exc_info is not None and not isinstance(result.exception, SystemExit):
        text += "\n--- exception\n" + "".join(traceback.format_exception(*result.exc_info))
    return text


@pytest.fixture(scope="session")
def run_cli(test_models_importable) -> Callable:
    """``run_cli(*args, code=0)``: run ``edgekit ARGS`` in-process; assert the exit code and that no traceback
    reached the user; return click's Result (``.stdout``, ``.stderr``, ``.output`` = both)."""
    from click.testing import CliRunner

    from edgekit.cli import cli

    def run(*args, code: int = 0):
        runner = CliRunner()
        with _preserved_logging():
            result = runner.invoke(cli, [str(a) for a in args], prog_name="edgekit")
        assert result.exit_code == code, _describe(result)
        # an exit through click leaves SystemExit here; anything else escaped the CLI's error handling
        assert result.exception is None or isinstance(result.exception, SystemExit), _describe(result)
        assert "Traceback" not in result.output, _describe(result)
        return result

    return run


@pytest.fixture
def fp32(tmp_path):
    """The small conv net of tests/onnx_graphs.py as an FP32 ONNX file, its layers named like exported ones."""
    import onnx

    from edgekit.export.onnx import name_weighted_nodes
    from tests.onnx_graphs import conv_net

    model = conv_net()
    name_weighted_nodes(model)
    path = tmp_path / "fp32.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def library():
    """The built native ai.edgekit library's path; skips without it, except in CI (CI set), where it fails."""
    from edgekit.kernels import ort_native

    path = ort_native.library_path()
    if path is None:
        msg = "libedgekit_ort.so is not built (python runtimes/onnxruntime/build.py)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must build the native library: {msg}")
        pytest.skip(msg)
    return path
