"""Channel importance from BatchNorm statistics (edgekit.compress.bnstats): quadrature against Monte Carlo, the
recorded statistics against the modules, importance against activation importance on data that *is* the training
distribution, and the structural step ranking channels by it."""

import numpy as np
import onnx
import pytest
import torch

from edgekit.compress import bnstats
from edgekit.compress.channels import channel_groups, channel_importance
from edgekit.data import Dataset
from edgekit.export.onnx import export_onnx
from edgekit.iospec import TensorSpec
from edgekit.model import LoadedModel
from edgekit.plan import LayerChoice, Plan
from edgekit.structure import apply_structure, group_importance, sample_feeds

SPEC = (TensorSpec("x", ("batch", 4, 6, 6), "float32"),)
TRAIN_SCALE = torch.tensor([3.0, 0.2, 1.0, 0.5]).view(1, 4, 1, 1)  # the "training data": per-channel scales
TRAIN_SHIFT = torch.tensor([1.0, -0.5, 0.0, 2.0]).view(1, 4, 1, 1)


def _train_data(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 6, 6, generator=g) * TRAIN_SCALE + TRAIN_SHIFT


def _calibrate(net, data) -> torch.nn.Module:
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: the running statistics are exactly the data's
    net.train()
    with torch.no_grad():
        net(data)
    return net.eval()


def _pointwise_net():
    """1x1 conv -> BN -> ReLU6 -> 1x1 conv: on Gaussian inputs the first conv's output is exactly Gaussian."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 16, 1), torch.nn.BatchNorm2d(16), torch.nn.ReLU6(),
                              torch.nn.Conv2d(16, 8, 1))
    with torch.no_grad():
        net[1].weight.copy_(torch.linspace(0.2, 3.0, 16)[torch.randperm(16)])
        net[1].bias.copy_(torch.linspace(-2.0, 3.0, 16)[torch.randperm(16)])
    return _calibrate(net, _train_data(512, 1))


def _mbconv_net():
    """expand 1x1 -> BN -> ReLU6 -> depthwise 3x3 -> BN -> ReLU6 -> project 1x1 (EfficientNet-Lite's block)."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(4, 12, 1, bias=False), torch.nn.BatchNorm2d(12), torch.nn.ReLU6(),
        torch.nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False), torch.nn.BatchNorm2d(12), torch.nn.ReLU6(),
        torch.nn.Conv2d(12, 6, 1))
    net = _calibrate(net, _train_data(256, 2))
    with torch.no_grad():  # the depthwise BN decides which channels carry information; the expand BN says otherwise
        net[4].weight.copy_(torch.tensor([0.01, 2.0, 0.01, 1.5, 0.01, 0.01, 2.5, 0.01, 0.01, 1.0, 0.01, 0.01]))
        net[4].bias.copy_(torch.full((12,), 2.0))
        net[1].weight.copy_(torch.tensor([3.0, 0.1, 3.0, 0.1, 3.0, 3.0, 0.1, 3.0, 0.1, 0.1, 3.0, 3.0]))
    return net


def _export(net, tmp_path, name="m.onnx"):
    loaded = LoadedModel(name="t", source="test", inputs=SPEC, output_names=("y",), sha256="0" * 64, module=net)
    return export_onnx(loaded, tmp_path / name)


@pytest.mark.parametrize("fn", [None, lambda z: np.clip(z, 0, 6), lambda z: np.maximum(z, 0),
                                lambda z: z * np.clip(z / 6 + 0.5, 0, 1)], ids=["identity", "relu6", "relu", "hswish"])
def test_gaussian_moments_match_monte_carlo(fn):
    mean = np.array([-3.0, -0.5, 0.0, 1.0, 2.5, 5.5, 8.0])
    std = np.array([0.3, 1.0, 2.0, 0.7, 3.0, 1.5, 0.5])
    m1, sd = bnstats.gaussian_moments(mean, std, fn)
    z = np.random.default_rng(0).standard_normal((400_000, 1)) * std + mean
    a = z if fn is None else fn(z)
    # 400k samples: Monte Carlo's own error is ~0.2 % of std; the quadrature's at clip's kinks about as much
    assert np.all(np.abs(m1 - a.mean(0)) <= 0.02 * np.abs(a.mean(0)) + 0.01 * std), (m1, a.mean(0))
    np.testing.assert_allclose(sd, a.std(0), rtol=0.02, atol=1e-3)


def test_export_records_each_conv_with_the_batchnorm_that_reads_it(tmp_path):
    net = _mbconv_net()
    art = _export(net, tmp_path)
    stats = bnstats.load(art.path)
    convs = {n.name for n in onnx.load(str(art.path)).graph.node if n.op_type == "Conv"}
    assert set(stats) == {"0", "3"} <= convs  # the project conv has no BatchNorm after it
    for conv, bn in (("0", net[1]), ("3", net[4])):
        np.testing.assert_allclose(stats[conv][0], bn.bias.detach().numpy(), rtol=1e-6)
        np.testing.assert_allclose(stats[conv][1], np.abs(bn.weight.detach().numpy()), rtol=1e-6)


def test_a_record_is_used_only_for_the_bytes_it_was_written_for(tmp_path, caplog):
    art = _export(_mbconv_net(), tmp_path)
    assert bnstats.load(art.path) is not None
    model = onnx.load(str(art.path))
    model.producer_name = "edited after the export"
    onnx.save(model, str(art.path))
    assert bnstats.load(art.path) is None
    assert "another version" in caplog.text


def test_no_batchnorm_no_record_and_a_stale_record_is_removed(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    stale = bnstats.stats_path(tmp_path / "m.onnx")
    stale.write_bytes(b"left by an earlier export")
    _export(net, tmp_path)
    assert not stale.exists()
    assert bnstats.load(tmp_path / "m.onnx") is None


def test_importance_equals_activation_importance_on_the_training_distribution(tmp_path):
    """On data drawn from the distribution the BatchNorm statistics describe (Gaussian inputs through a 1x1 conv are
    Gaussian), centred activation importance and BatchNorm importance agree channel by channel."""
    art = _export(_pointwise_net(), tmp_path)
    model = onnx.load(str(art.path))
    groups = channel_groups(model)
    assert [g.channels for g in groups] == [16]
    from_bn = bnstats.importance(model, groups, bnstats.load(art.path))[groups[0].name]
    data = _train_data(256, 7).numpy()
    from_data = channel_importance(model, groups, [{"x": data[i:i + 1]} for i in range(len(data))],
                                   centered=True)[groups[0].name]
    # channel_importance sums over rows (||X_c||_2 = sqrt(rows) * std): compare the shapes, not the scale
    np.testing.assert_allclose(from_bn / from_bn.sum(), from_data / from_data.sum(), rtol=0.05, atol=1e-3)
    assert np.argsort(from_bn)[-8:].tolist() == np.argsort(from_data)[-8:].tolist()


def test_the_depthwise_batchnorm_ranks_an_expand_group(tmp_path):
    art = _export(_mbconv_net(), tmp_path)
    model = onnx.load(str(art.path))
    groups = channel_groups(model)
    scores = bnstats.importance(model, groups, bnstats.load(art.path))
    (name,) = scores
    assert sorted(np.argsort(-scores[name])[:4].tolist()) == [1, 3, 6, 9]


def test_group_importance_falls_back_to_activations(tmp_path):
    art = _export(_mbconv_net(), tmp_path)
    model = onnx.load(str(art.path))
    groups = channel_groups(model)
    feeds = [{"x": _train_data(1, s).numpy()} for s in range(4)]
    want = channel_importance(model, groups, feeds, centered=True)
    for got in (group_importance(model, groups, feeds, None), group_importance(model, groups, feeds, {})):
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_a_path_it_does_not_model_is_left_to_activations(tmp_path):
    net = _mbconv_net()
    net[5] = torch.nn.ELU()  # not an activation bnstats models
    art = _export(net, tmp_path)
    model = onnx.load(str(art.path))
    groups = channel_groups(model)
    assert groups and bnstats.importance(model, groups, bnstats.load(art.path)) == {}


def test_the_structural_step_keeps_the_channels_the_batchnorm_statistics_rank_first(tmp_path):
    """Calibration data unlike the training data ranks other channels first; the plan's pruning follows BatchNorm."""
    art = _export(_mbconv_net(), tmp_path)
    model = onnx.load(str(art.path))
    (group,) = channel_groups(model)
    rng = np.random.default_rng(3)
    calib = Dataset(name="c", inputs={"x": (rng.normal(0, 1, (24, 4, 6, 6)) * [[[[0.1]], [[4.0]], [[0.1]], [[0.1]]]]
                                            ).astype(np.float32)}, labels=None, source="test")
    by_data = channel_importance(model, [group], sample_feeds(calib), centered=True)[group.name]
    assert sorted(np.argsort(-by_data)[:4].tolist()) != [1, 3, 6, 9]  # the test means something
    layers = tuple(LayerChoice(layer=n.name, option="fp32+ch4" if n.name in group.layers else "fp32")
                   for n in model.graph.node if n.op_type == "Conv")
    plan = Plan(model_sha256=art.sha256, target="cpu-x86", precision="fp32", layers=layers)
    w0 = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = next(n for n in model.graph.node if n.name == group.producer)

    def kept_channels(importance: str) -> list[int]:
        pruned, _, summary = apply_structure(art.path, plan, calib, importance=importance)
        assert summary["pruned"] == {group.name: [12, 4]}
        w1 = {i.name: onnx.numpy_helper.to_array(i) for i in pruned.graph.initializer}
        new_producer = next(n for n in pruned.graph.node if n.name == group.producer)
        return [next(c for c in range(12) if np.array_equal(w0[producer.input[1]][c], row))
                for row in w1[new_producer.input[1]]]

    assert kept_channels("batchnorm") == [1, 3, 6, 9]
    assert kept_channels("activations") == sorted(np.argsort(-by_data, kind="stable")[:4].tolist())  # the default


def test_an_unknown_importance_is_a_config_error_and_batchnorm_without_a_record_falls_back(tmp_path):
    from edgekit.errors import ConfigError
    from edgekit.structure import channel_stats

    art = _export(_mbconv_net(), tmp_path)
    with pytest.raises(ConfigError, match="activations, batchnorm"):
        channel_stats(art.path, "weights")
    assert channel_stats(art.path, "activations") is None and channel_stats(art.path, "batchnorm")
    bnstats.stats_path(art.path).unlink()
    assert channel_stats(art.path, "batchnorm") is None


def test_the_cli_records_batchnorm_importance_in_the_plan_and_apply_replays_it(run_cli, tmp_path):
    """``--channel-importance batchnorm`` on a PyTorch model with BatchNorm: the plan says so, and ``edgekit apply``
    ranks the channels the same way (identical bytes)."""
    import json

    out = tmp_path / "out"
    result = run_cli("build", "--model", "builtin:digits-bn", "--budget", "size=20KB", "--space", "joint",
                     "--channel-importance", "batchnorm", "--out", out, "--json", "--no-latency",
                     "--allow-unverified")  # what is checked here is the plan and its replay, not the accuracy
    assert json.loads(result.stdout)["size"]["artifact_bytes"] <= 20_000
    bundle = out / "digits-bn"
    plan = Plan.load(bundle / "plan.json")
    assert plan.is_structural and plan.activations["structure"]["importance"] == "batchnorm"
    again = tmp_path / "again"
    run_cli("apply", bundle / "plan.json", "--model", "builtin:digits-bn", "--out", again, "--no-latency",
            "--allow-unverified")
    assert (again / "digits-bn" / "model.onnx").read_bytes() == (bundle / "model.onnx").read_bytes()


def test_channel_importance_needs_the_joint_space(run_cli, tmp_path):
    result = run_cli("build", "--model", "builtin:digits-cnn", "--budget", "size=30KB", "--channel-importance",
                     "batchnorm", "--out", tmp_path / "o", code=3)
    assert "--space joint" in result.output and not (tmp_path / "o").exists()


def test_allocation_rounds_keep_the_ranking_setting_and_drop_only_the_recovery():
    from edgekit.joint import without_recovery

    settings = {"scheme": "w8a8", "structure": {"recover_steps": 50, "importance": "batchnorm"}}
    assert without_recovery(settings) == {"scheme": "w8a8", "structure": {"importance": "batchnorm"}}
    assert without_recovery({"scheme": "w8a8", "structure": {"recover_steps": 50}}) == {"scheme": "w8a8"}
    assert settings["structure"]["recover_steps"] == 50  # the plan's own settings are not touched
