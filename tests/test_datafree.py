"""Data-free calibration: synthesized inputs match the BatchNorm statistics the model was trained with."""

import numpy as np
import pytest
import torch

from edgekit.datafree import synthesize
from edgekit.errors import CalibrationError
from edgekit.iospec import TensorSpec


def _bn_net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8))
    # "training data" far from what N(0, 1) inputs give: per-channel offsets and scales
    gen = torch.Generator().manual_seed(1)
    data = torch.randn(256, 3, 8, 8, generator=gen) * torch.tensor([3.0, 0.5, 2.0]).view(1, 3, 1, 1) + \
        torch.tensor([2.0, -1.0, 0.5]).view(1, 3, 1, 1)
    for bn in (net[1], net[4]):
        bn.momentum = None  # cumulative average: the running statistics are exactly the data's
    net.train()
    with torch.no_grad():
        net(data)
    return net.eval()


def _gap(net, x):
    gaps = []
    with torch.no_grad():
        h = net[0](torch.from_numpy(x))
        for bn, rest in ((net[1], net[2:4]), (net[4], None)):
            m, v = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)
            gaps.append(float(((m - bn.running_mean) ** 2).mean() + ((v - bn.running_var) ** 2).mean()))
            if rest is not None:
                h = rest(bn(h))
    return sum(gaps)


def test_synthesized_inputs_match_batchnorm_statistics():
    net = _bn_net()
    spec = (TensorSpec("input", ("batch", 3, 8, 8)),)
    data = synthesize(net, spec, n=16, steps=80)
    x = data.inputs["input"]
    assert x.shape == (16, 3, 8, 8) and np.isfinite(x).all()
    start = np.random.default_rng(0).normal(size=x.shape).astype(np.float32)
    assert _gap(net, x) < 0.25 * _gap(net, start)
    assert not net.training  # the model is left as it was


def test_models_without_batchnorm_are_refused():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)).eval()
    with pytest.raises(CalibrationError, match="no BatchNorm"):
        synthesize(net, (TensorSpec("input", ("batch", 3, 8, 8)),))


def test_cli_calib_none_needs_held_out_data_and_batchnorm(run_cli, tmp_path):
    out = tmp_path / "o"
    r = run_cli("build", "--model", "edgekit.zoo:make_digits_cnn", "--input-shape", "1,1,8,8", "--calib", "none",
                "--out", out, code=3)
    assert "held-out" in r.stderr
    r = run_cli("build", "--model", "builtin:digits-cnn", "--calib", "none", "--out", out, code=5)
    assert "no BatchNorm" in r.stderr
    assert not (out / "digits-cnn").exists()


def test_probe_samples_for_models_with_batchnorm_only():
    """``probe_samples``: BatchNorm-statistics inputs for a torch model with BatchNorm; None (not an error) for a
    model without BatchNorm or without a torch module, so the joint allocator measures on calibration data alone."""
    from edgekit.data import Dataset
    from edgekit.datafree import probe_samples

    spec = (TensorSpec("input", ("batch", 3, 8, 8), "float32"),)
    probe = probe_samples(_bn_net(), spec, n=4, seed=0)
    assert isinstance(probe, Dataset) and probe.inputs["input"].shape == (4, 3, 8, 8)
    assert np.isfinite(probe.inputs["input"]).all()
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    assert probe_samples(plain, spec, n=4) is None
    assert probe_samples(None, spec, n=4) is None


def test_probe_samples_are_kept_per_model_and_made_again_when_anything_they_depend_on_changes(tmp_path, monkeypatch):
    from edgekit import datafree

    spec = (TensorSpec("input", ("batch", 3, 8, 8), "float32"),)
    a, b = "a" * 64, "b" * 64
    first = datafree.probe_samples(_bn_net(), spec, n=4, seed=0, cache=tmp_path, model_sha256=a)
    files = list(tmp_path.glob("probe-*.npz"))
    assert len(files) == 1

    def made_again(*args, **kwargs):
        raise AssertionError("made again")

    monkeypatch.setattr(datafree, "synthesize", made_again)
    again = datafree.probe_samples(_bn_net(), spec, n=4, seed=0, cache=tmp_path, model_sha256=a)
    np.testing.assert_array_equal(again.inputs["input"], first.inputs["input"])
    assert again.source == first.source
    for changed in ({"model_sha256": b}, {"seed": 1}, {"n": 3}):  # another model, seed or count: not that file
        with pytest.raises(AssertionError, match="made again"):
            datafree.probe_samples(_bn_net(), spec, **{"n": 4, "seed": 0, "model_sha256": a, **changed},
                                   cache=tmp_path)
    monkeypatch.undo()
    files[0].write_bytes(b"not an npz")  # an unreadable file is made again, and replaced
    redo = datafree.probe_samples(_bn_net(), spec, n=4, seed=0, cache=tmp_path, model_sha256=a)
    np.testing.assert_array_equal(redo.inputs["input"], first.inputs["input"])
    assert np.load(files[0])["input"].shape == (4, 3, 8, 8)
    assert datafree.probe_samples(_bn_net(), spec, n=4, seed=0) is not None  # no cache: nothing written
    assert len(list(tmp_path.glob("probe-*.npz"))) == 1
