"""``w4a8``: 4-bit weights (symmetric, per output channel) with uint8 activations, stored as int4 in a QDQ graph.

ONNX Runtime quantizes the layer as ``w8a8``; this module then replaces its weight with 4-bit values: per output
channel the scale whose rounding error is least over a grid of clipping factors (MSE-optimal clipping), values in
[−8, 7] written as an INT4 initializer (two per byte on disk). The int32 bias is re-rounded to the new weight scale.
At load, ``agent.runtime.widen_int4`` widens those initializers to int8 (same values), so the layer runs in ONNX
Runtime's integer kernels at int8 speed while the artifact stores half the weight bytes. No torch here.
"""

from __future__ import annotations

import numpy as np

from edgekit.compress.wquant import CLIP_GRID
from edgekit.errors import ExportError

INT4_MIN, INT4_MAX = -8, 7


def int4_per_channel(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 4-bit codes (int8 array in [−8, 7]) and per-channel float32 scales of ``w`` along ``axis``, with
    the clipping factor chosen per channel to minimise the squared error."""
    w = np.moveaxis(np.asarray(w, dtype=np.float32), axis, 0)
    flat = w.reshape(w.shape[0], -1)
    amax = np.maximum(np.abs(flat).max(axis=1), 1e-12)
    best_err = np.full(len(flat), np.inf)
    best_scale = amax / INT4_MAX
    for a in CLIP_GRID:
        scale = amax * a / INT4_MAX
        q = np.clip(np.round(flat / scale[:, None]), INT4_MIN, INT4_MAX)
        err = ((q * scale[:, None] - flat) ** 2).sum(axis=1)
        better = err < best_err
        best_err, best_scale = np.where(better, err, best_err), np.where(better, scale, best_scale)
    q = np.clip(np.round(flat / best_scale[:, None]), INT4_MIN, INT4_MAX).astype(np.int8)
    return np.moveaxis(q.reshape(w.shape), 0, axis), best_scale.astype(np.float32)


def to_int4(qdq, fp32, layers: list[str]) -> int:
    """Rewrite, in the QDQ ModelProto ``qdq`` (in place), the weights of ``layers`` as int4 per channel computed from
    the float weights in ``fp32``; re-round their int32 biases to the new scales. Returns the number rewritten."""
    import ml_dtypes
    from onnx import numpy_helper

    inits = {i.name: i for i in qdq.graph.initializer}
    producer = {o: n for n in qdq.graph.node for o in n.output}
    users: dict[str, int] = {}
    for n in qdq.graph.node:
        for t in n.input:
            users[t] = users.get(t, 0) + 1
    fp_nodes = {n.name: n for n in fp32.graph.node}
    fp_inits = {i.name: i for i in fp32.graph.initializer}
    done = 0
    for node in qdq.graph.node:
        if node.name not in layers:
            continue
        wdq = producer.get(node.input[1]) if len(node.input) > 1 else None
        if wdq is None or wdq.op_type != "DequantizeLinear" or wdq.input[0] not in inits:
            raise ExportError(f"layer {node.name!r}: no quantized weight to rewrite as int4")
        axis = next((a.i for a in wdq.attribute if a.name == "axis"), 1)
        src = fp_nodes.get(node.name)
        if src is None or src.input[1] not in fp_inits:
            raise ExportError(f"layer {node.name!r}: float weight not found")
        w = numpy_helper.to_array(fp_inits[src.input[1]])
        q, scale = int4_per_channel(w, axis)
        for t in wdq.input[1:3]:
            if t and users.get(t, 0) > 1:
                raise ExportError(f"layer {node.name!r}: its weight scale {t!r} is shared")
        old_scale = numpy_helper.to_array(inits[wdq.input[1]]).astype(np.float64)
        inits[wdq.input[0]].CopyFrom(numpy_helper.from_array(q.astype(ml_dtypes.int4), wdq.input[0]))
        inits[wdq.input[1]].CopyFrom(numpy_helper.from_array(scale, wdq.input[1]))
        if len(wdq.input) > 2 and wdq.input[2]:
            zp = np.zeros(numpy_helper.to_array(inits[wdq.input[2]]).shape, dtype=ml_dtypes.int4)
            inits[wdq.input[2]].CopyFrom(numpy_helper.from_array(zp, wdq.input[2]))
        bdq = producer.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if bdq is not None and bdq.op_type == "DequantizeLinear" and bdq.input[0] in inits:
            if users.get(bdq.input[1], 0) > 1:
                raise ExportError(f"layer {node.name!r}: its bias scale is shared")
            bq = numpy_helper.to_array(inits[bdq.input[0]]).astype(np.float64)
            bscale = numpy_helper.to_array(inits[bdq.input[1]]).astype(np.float64)
            bias = bq * bscale
            new_scale = bscale / old_scale * scale  # input scale x new weight scale
            new_q = np.clip(np.round(bias / new_scale), -(2**31), 2**31 - 1).astype(np.int32)
            inits[bdq.input[0]].CopyFrom(numpy_helper.from_array(new_q, bdq.input[0]))
            inits[bdq.input[1]].CopyFrom(numpy_helper.from_array(new_scale.astype(np.float32), bdq.input[1]))
        done += 1
    if done != len(set(layers)):
        raise ExportError(f"only {done} of {len(set(layers))} int4 layers were found in the quantized graph")
    return done
