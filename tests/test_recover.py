"""Recovery fine-tuning (edgekit/compress/recover.py): distillation from the original model repairs a damaged
digits CNN (checked independently with ONNX Runtime), the graph and its initializers keep their names and shapes,
the no-regression rule, the per-sample path of fixed-batch graphs, and TorchGraph's trainable initializers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from edgekit.agent_torch.onnx_torch import TorchGraph  # noqa: E402
from edgekit.analyze import distortion  # noqa: E402
from edgekit.compress.recover import (  # noqa: E402
    RecoveryError,
    recover,
    teacher_outputs,
    trainable_initializers,
)
from edgekit.context import Context  # noqa: E402
from edgekit.datasets import digits  # noqa: E402
from edgekit.errors import ConfigError  # noqa: E402
from edgekit.export.onnx import export_onnx  # noqa: E402
from edgekit.model import load_model  # noqa: E402
from edgekit.zoo import train_digits_cnn  # noqa: E402
from tests.onnx_graphs import conv_net  # noqa: E402


def _prep(images: np.ndarray) -> np.ndarray:
    return ((images - 0.5) / 0.5).transpose(0, 3, 1, 2).astype(np.float32).copy()


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


@pytest.fixture(scope="module")
def digits_cnn(tmp_path_factory):
    """A digits CNN trained briefly (3 epochs), exported the way edgekit exports it (dynamic batch), with 64
    calibration feeds, their teacher outputs, and evaluation images."""
    folder = tmp_path_factory.mktemp("recover")
    loaded = load_model("edgekit.zoo:make_digits_cnn", input_shapes=[(1, 1, 8, 8)], ctx=Context(cache_dir=folder))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny net: more threads only contend
    try:
        loaded.module.load_state_dict(train_digits_cnn(epochs=3).state_dict())
    finally:
        torch.set_num_threads(threads)
    teacher = onnx.load(str(export_onnx(loaded, folder / "fp32.onnx").path))
    calib = _prep(digits("calibration")[0][:64])
    feeds = [{"input": calib[i:i + 1]} for i in range(len(calib))]
    return {"teacher": teacher, "feeds": feeds, "outputs": teacher_outputs(teacher, feeds),
            "eval": _prep(digits("evaluation")[0][:200])}


def _damaged(teacher: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """The teacher with every weight perturbed (30 % of its std) and a quarter of the second conv's channels
    zeroed, as channel pruning would leave them."""
    rng = np.random.default_rng(seed)
    student = onnx.ModelProto()
    student.CopyFrom(teacher)
    weighted = set(trainable_initializers(teacher))
    for init in student.graph.initializer:
        if init.name not in weighted:
            continue
        a = numpy_helper.to_array(init).copy()
        a += rng.normal(0, 0.3 * a.std(), a.shape).astype(np.float32)
        if init.name in ("2.weight", "2.bias"):
            a[:8] = 0
        init.CopyFrom(numpy_helper.from_array(a.astype(np.float32), init.name))
    return student


def _fixed_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for vi in (*out.graph.input, *out.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_value = 1
    return out


# ------------------------------------------------------------------------------------------------ recovery


def test_recovery_repairs_a_damaged_cnn_checked_with_onnx_runtime(digits_cnn):
    teacher, feeds, outs = digits_cnn["teacher"], digits_cnn["feeds"], digits_cnn["outputs"]
    student = _damaged(teacher)
    calls = []
    r = recover(student, outs, feeds, steps=40, lr=1e-3, progress=lambda *a: calls.append(a))
    assert r.steps == 40 and not r.kept_original and r.seconds > 0
    assert r.loss_after < 0.5 * r.loss_before, (r.loss_before, r.loss_after)
    assert r.loss == r.loss_after
    assert [c[:2] for c in calls] == [(k, 40) for k in range(1, 41)] and all(np.isfinite(c[2]) for c in calls)

    # loss_before is the repo's "mse" distortion on the held-out last eighth, as ONNX Runtime computes it
    held = np.concatenate([f["input"] for f in feeds[-8:]])
    ref_held = np.concatenate(outs[-8:])
    assert r.loss_before == pytest.approx(distortion(ref_held, _ort(student, held), "mse"), rel=1e-3)
    assert r.loss_after == pytest.approx(distortion(ref_held, _ort(r.model, held), "mse"), rel=1e-3)

    # on images it never saw, the recovered model is closer to the teacher, and agrees with it more often
    x = digits_cnn["eval"]
    ref = _ort(teacher, x)
    before, after = _ort(student, x), _ort(r.model, x)
    assert distortion(ref, after, "mse") < 0.5 * distortion(ref, before, "mse")
    assert (after.argmax(1) == ref.argmax(1)).mean() >= (before.argmax(1) == ref.argmax(1)).mean()

    # the same graph: nodes, initializer names, shapes and types; only the weighted layers' values changed
    onnx.checker.check_model(r.model)
    assert r.model.graph.node == student.graph.node
    got, old = _inits(r.model), _inits(student)
    assert list(got) == list(old)
    assert all(got[n].shape == old[n].shape and got[n].dtype == old[n].dtype for n in old)
    assert set(r.trained) == set(trainable_initializers(student)) == {n for n in old if n[0].isdigit()}
    assert all(not np.array_equal(got[n], old[n]) for n in r.trained)
    assert all(np.array_equal(got[n], old[n]) for n in old if n not in r.trained)
    np.testing.assert_array_equal(_inits(student)["2.weight"], _inits(_damaged(teacher))["2.weight"])  # untouched


def test_recovery_is_deterministic_and_takes_a_teacher_callable(digits_cnn):
    teacher, feeds, outs = digits_cnn["teacher"], digits_cnn["feeds"], digits_cnn["outputs"]
    student = _damaged(teacher, seed=1)
    a = recover(student, outs, feeds, steps=5, lr=1e-3, seed=3)
    sess = ort.InferenceSession(teacher.SerializeToString(), providers=["CPUExecutionProvider"])
    b = recover(student, lambda feed: sess.run(None, dict(feed)), feeds, steps=5, lr=1e-3, seed=3)
    assert a.loss_before == pytest.approx(b.loss_before, rel=1e-6)
    for name, value in _inits(a.model).items():
        np.testing.assert_allclose(_inits(b.model)[name], value, rtol=1e-5, atol=1e-6)


def test_zero_steps_returns_the_model_unchanged(digits_cnn):
    student = _damaged(digits_cnn["teacher"])
    r = recover(student, digits_cnn["outputs"], digits_cnn["feeds"], steps=0)
    assert r.steps == 0 and not r.kept_original and r.loss_before == r.loss_after > 0
    assert r.model is not student
    assert r.model.SerializeToString() == student.SerializeToString()


def test_a_diverging_run_keeps_the_original_weights(digits_cnn):
    student = _damaged(digits_cnn["teacher"])
    r = recover(student, digits_cnn["outputs"], digits_cnn["feeds"], steps=10, lr=10.0)
    assert r.kept_original
    assert not r.loss_after <= r.loss_before  # worse, or not finite
    assert r.loss == r.loss_before
    assert r.model.SerializeToString() == student.SerializeToString()


def test_a_fixed_batch_graph_is_trained_one_sample_at_a_time(digits_cnn):
    teacher = _fixed_batch(digits_cnn["teacher"])
    student = _damaged(teacher)
    r = recover(student, digits_cnn["outputs"], digits_cnn["feeds"], steps=15, lr=1e-3)
    assert not r.kept_original and r.loss_after < 0.7 * r.loss_before
    x = digits_cnn["eval"][:1]
    assert _ort(r.model, x).shape == (1, 10)


def test_matmul_weights_and_their_add_bias_are_trained():
    model = conv_net()
    rng = np.random.default_rng(0)
    model.graph.initializer.append(numpy_helper.from_array(rng.normal(size=5).astype(np.float32), "head.bias"))
    model.graph.node[-1].output[0] = "mm"
    model.graph.node.append(helper.make_node("Add", ["mm", "head.bias"], ["logits"], name="n3_bias"))
    assert trainable_initializers(model) == ["stem.weight", "stem.bias", "dw.weight", "fc.weight", "fc.bias",
                                             "head.weight", "head.bias"]
    feeds = [{"input": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(24)]
    outs = teacher_outputs(model, feeds)
    student = onnx.ModelProto()
    student.CopyFrom(model)
    for init in student.graph.initializer:
        a = numpy_helper.to_array(init)
        init.CopyFrom(numpy_helper.from_array((a * 0.7).astype(np.float32), init.name))
    r = recover(student, outs, feeds, steps=60, lr=3e-3, batch=4)
    assert not r.kept_original and r.loss_after < 0.5 * r.loss_before
    assert set(r.trained) == {i.name for i in model.graph.initializer}


# ------------------------------------------------------------------------------------------------ arguments


def test_bad_arguments(digits_cnn):
    teacher, feeds, outs = digits_cnn["teacher"], digits_cnn["feeds"], digits_cnn["outputs"]
    for kwargs in ({"steps": -1}, {"steps": 1.5}, {"steps": 1, "batch": 0}, {"steps": 1, "lr": 0.0},
                   {"steps": 1, "lr": float("nan")}):
        with pytest.raises(ValueError):
            recover(teacher, outs, feeds, **kwargs)
    with pytest.raises(ValueError, match="feeds"):
        recover(teacher, [], [], steps=1)
    with pytest.raises(ValueError, match="aligned"):
        recover(teacher, outs[:-1], feeds, steps=1)
    with pytest.raises(ValueError, match="at least 2"):
        recover(teacher, outs[:1], feeds[:1], steps=1)
    with pytest.raises(ValueError, match="lacks graph inputs"):
        recover(teacher, outs, [{"x": f["input"]} for f in feeds], steps=1)
    with pytest.raises(ValueError, match="shape"):
        recover(teacher, [o[:, :5] for o in outs], feeds, steps=1)


def test_a_graph_the_interpreter_cannot_run_is_a_clear_error():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Mish", ["m"], ["y"], name="act")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]), opset_imports=[helper.make_opsetid("", 18)])
    feeds = [{"x": np.ones((1, 4), np.float32)} for _ in range(4)]
    with pytest.raises(RecoveryError, match="Mish") as info:
        recover(model, [np.ones((1, 4), np.float32)] * 4, feeds, steps=2)
    assert isinstance(info.value, ValueError) and isinstance(info.value, ConfigError)
    assert "--recover" in str(info.value)


# ------------------------------------------------------------------------------------- TorchGraph(trainable=)


def test_torch_graph_trainable_initializers_are_parameters_and_never_folded():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])
    inits = [numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w"),
             numpy_helper.from_array(np.array([1, 0], np.int64), "perm_axes")]
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),  # folded unless w is trainable
             helper.make_node("MatMul", ["x", "wt"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    frozen = TorchGraph(model)
    assert not list(frozen.parameters()) and frozen.initializer_parameters() == {}
    graph = TorchGraph(model, trainable=["w"])
    params = graph.initializer_parameters()
    assert list(params) == ["w"] and isinstance(params["w"], torch.nn.Parameter)
    xs = torch.ones(2, 3)
    out = graph(xs)
    torch.testing.assert_close(out, frozen(xs))
    out.sum().backward()
    torch.testing.assert_close(params["w"].grad, torch.full((2, 3), 2.0))
    with pytest.raises(ValueError, match="perm_axes"):
        TorchGraph(model, trainable=["perm_axes"])
    with pytest.raises(ValueError, match="nope"):
        TorchGraph(model, trainable=["nope"])
