"""A numpy model of the PTX ``mma.sp`` register fragments that ``matmul_sparse24.cu`` uses (numpy only).

Two instructions, with the sparse operand A = the weights (rows = output features n, sparse along K) and the dense
operand B = the activations transposed (K x 8 tokens):

- ``f16``: ``mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32``, sparsity selector 0;
- ``s8``:  ``mma.sp::ordered_metadata.sync.aligned.m16n8k64.row.col.s32.s8.u8.s32``, sparsity selector 0.

Lane ``l`` has ``g = l // 4`` and ``t = l % 4``. Each operand is 4 32-bit registers per lane:

=====  ==========================================================  ==========================================
       f16 (2 halves per register, low half first)                 s8 (4 bytes per register, low byte first)
=====  ==========================================================  ==========================================
A[r]   row ``g + 8 (r & 1)``, compressed cols ``2t + 8 (r >> 1) + {0,1}``  row ``g + 8 (r & 1)``, compressed cols
                                                                   ``4t + 16 (r >> 1) + {0..3}``
B[r]   k ``8r + 2t + {0,1}``, token ``g``                          k ``16r + 4t + {0..3}``, token ``g``
D[i]   row ``g + 8 (i >> 1)``, token ``2t + (i & 1)`` (f32 / s32, both)
E      lanes ``4g + h`` (h = 0, 1): bits 0-15 row ``g``, bits      lane ``4g + t``: row ``g + 8 (t & 1)``,
       16-31 row ``g + 8``, groups ``4h .. 4h + 3``                groups ``8 (t >> 1) .. 8 (t >> 1) + 7``
=====  ==========================================================  ==========================================

E holds one nibble ``i0 | i1 << 2`` (``edgekit.kernels.sparse24``'s nibble) per group of 4 dense K values, nibble
``j`` in bits ``4j .. 4j + 3``. f16: each 16-bit half holds 4 groups of one row (nibble ``j`` of lane ``4g + h`` is
row ``g + 8 (j >> 2)``, group ``4h + (j & 3)``). s8: the whole register is 8 consecutive groups of one row (nibble
``j`` of lane ``4g + t`` is row ``g + 8 (t & 1)``, group ``8 (t >> 1) + j``), so it is exactly one little-endian
32-bit word of the op's ``indices`` row. Compressed column ``2q`` / ``2q + 1`` sits at dense ``4q + i0`` /
``4q + i1``.

Sources. A, B and D follow the PTX ISA's fragment formulas. s8 m16n8k64 A: row ``groupID`` for registers 0 and 2,
``groupID + 8`` for 1 and 3, each register the 4 kept values of 8 consecutive dense columns starting at
``8 threadID_in_group`` (+ 32 for registers 2, 3), i.e. compressed ``4t + 16 (r >> 1)``: the dense m16n8k32 s8 A
layout applied to the compressed 16 x 32 matrix, as the ISA spells out for sparse m16n8k128 u4 (same pattern, half
the element width). s8 B: the dense m16n8k32 s8 B layout doubled, k ``4 threadID_in_group + (i & 3) + 16 (i >> 2)``.
The f16 E layout is the one XLA's Triton sparse-dot lowering uses (16-bit metadata of rows g and g + 8, selector 0),
and the whole f16 model passed on an H100. The s8 E layout was MEASURED on an H100 (``infer_metadata_map``,
``runtimes/cuda/check_gpu.py``); an earlier reading of the PTX figure (lane ``4g + t`` = groups ``4t .. 4t + 3`` of
rows g and g + 8, like f16) was wrong. ``check_gpu.py`` also measures the A and B operand layouts independently of
each other (``b_probe_inputs`` / ``infer_b_map``: B alone; ``a_probe_inputs`` / ``infer_a_map``: A against B).

``kernel_metadata`` mirrors how the kernel builds E from the op's ``indices`` (f16: one ``__byte_perm`` per
register; s8: one word load).
"""

from __future__ import annotations

import numpy as np

KINDS = ("f16", "s8")
MMA_K = {"f16": 32, "s8": 64}  # dense K per instruction
_LANES = np.arange(32)


def a_coords(kind: str) -> np.ndarray:
    """[32, 4, E, 2] (row, compressed column) of each element of each A register."""
    g, t = _LANES // 4, _LANES % 4
    per = 2 if kind == "f16" else 4
    out = np.zeros((32, 4, per, 2), dtype=np.int64)
    for r in range(4):
        for e in range(per):
            out[:, r, e, 0] = g + 8 * (r & 1)
            out[:, r, e, 1] = (2 * t + 8 * (r >> 1) + e) if kind == "f16" else (4 * t + 16 * (r >> 1) + e)
    return out


def b_coords(kind: str) -> np.ndarray:
    """[32, 4, E, 2] (k, token) of each element of each B register."""
    g, t = _LANES // 4, _LANES % 4
    per = 2 if kind == "f16" else 4
    out = np.zeros((32, 4, per, 2), dtype=np.int64)
    for r in range(4):
        for e in range(per):
            out[:, r, e, 0] = (8 * r + 2 * t + e) if kind == "f16" else (16 * r + 4 * t + e)
            out[:, r, e, 1] = g
    return out


def d_coords() -> np.ndarray:
    """[32, 4, 2] (row, token) of each accumulator register."""
    g, t = _LANES // 4, _LANES % 4
    out = np.zeros((32, 4, 2), dtype=np.int64)
    for i in range(4):
        out[:, i, 0] = g + 8 * (i >> 1)
        out[:, i, 1] = 2 * t + (i & 1)
    return out


def e_coords(kind: str) -> np.ndarray:
    """[32, 8, 2] (row, group) controlled by nibble j of each lane's metadata register; -1 where ignored."""
    out = np.full((32, 8, 2), -1, dtype=np.int64)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        if kind == "f16":
            if t >= 2:
                continue  # selector 0: lanes 4g + 2 and 4g + 3 contribute nothing
            for j in range(8):
                out[lane, j] = (g + 8 * (j >> 2), 4 * t + (j & 3))
        else:  # measured on an H100 (sm_90), see the module docstring
            for j in range(8):
                out[lane, j] = (g + 8 * (t & 1), 8 * (t >> 1) + j)
    return out


def _per(kind: str) -> int:
    """Elements per 32-bit A / B register."""
    return 2 if kind == "f16" else 4


def _to_regs(kind: str, elems: np.ndarray) -> np.ndarray:
    """[32, 4, E] elements -> [32, 4] uint32 registers (little-endian packing)."""
    dt = np.float16 if kind == "f16" else (np.int8 if elems.dtype == np.int8 else np.uint8)
    return np.ascontiguousarray(elems.astype(dt)).view(np.uint32).reshape(32, 4)


def _from_regs(kind: str, regs: np.ndarray, dtype) -> np.ndarray:
    """[..., 32, 4] uint32 registers -> [..., 32, 4, E] elements."""
    regs = np.ascontiguousarray(np.asarray(regs).astype(np.uint32))
    return regs.view(dtype).reshape(regs.shape + (_per(kind),))


def lane_registers(kind: str, values: np.ndarray, nibbles: np.ndarray, x: np.ndarray):
    """Per-lane (A, B, E) for one instruction: ``values`` [16, K/2] compressed weights, ``nibbles`` [16, K/4] of
    ``i0 | i1 << 2``, ``x`` [K, 8] dense activations (K = MMA_K[kind]). Registers as uint32 arrays [32, 4], [32, 4],
    [32]. The activations of ``s8`` are uint8."""
    ac, bc, ec = a_coords(kind), b_coords(kind), e_coords(kind)
    A = _to_regs(kind, values[ac[..., 0], ac[..., 1]])
    B = _to_regs(kind, x[bc[..., 0], bc[..., 1]])
    E = np.zeros(32, dtype=np.uint32)
    for lane in range(32):
        for j in range(8):
            row, grp = ec[lane, j]
            if row >= 0:
                E[lane] |= np.uint32(int(nibbles[row, grp]) << (4 * j))
    return A, B, E


def emulate(kind: str, A: np.ndarray, B: np.ndarray, E: np.ndarray, emap: np.ndarray | None = None) -> np.ndarray:
    """D [..., 32, 4] (float64 for f16, int64 for s8) of one ``mma.sp`` with zero C per leading index, under this
    module's layouts (``emap`` overrides ``e_coords(kind)``, e.g. with a map measured by ``infer_metadata_map``).
    ``A``, ``B`` [..., 32, 4] and ``E`` [..., 32] uint32; any leading (batch) shape."""
    K = MMA_K[kind]
    vdt, xdt = (np.float16, np.float16) if kind == "f16" else (np.int8, np.uint8)
    A, B, E = np.asarray(A), np.asarray(B), np.asarray(E).astype(np.uint32)
    batch = A.shape[:-2]
    A, B, E = A.reshape(-1, 32, 4), B.reshape(-1, 32, 4), E.reshape(-1, 32)
    n = A.shape[0]
    ac, bc = a_coords(kind), b_coords(kind)
    vals = np.zeros((n, 16, K // 2), dtype=np.float64)
    xs = np.zeros((n, K, 8), dtype=np.float64)
    vals[:, ac[..., 0], ac[..., 1]] = _from_regs(kind, A, vdt)
    xs[:, bc[..., 0], bc[..., 1]] = _from_regs(kind, B, xdt)
    ec = e_coords(kind) if emap is None else np.asarray(emap)
    lanes, js = np.nonzero(ec[..., 0] >= 0)
    nib = np.zeros((n, 16, K // 4), dtype=np.int64)
    nib[:, ec[lanes, js, 0], ec[lanes, js, 1]] = (E[:, lanes] >> (4 * js).astype(np.uint32)) & 0xF
    xg = xs.reshape(n, 1, K // 4, 4, 8)  # [n, -, group, position, token]
    full = np.zeros((n, 16, 8))
    for half, idx in enumerate((nib & 3, nib >> 2)):
        picked = np.take_along_axis(xg, idx[:, :, :, None, None], axis=3)[:, :, :, 0, :]  # [n, row, group, token]
        full += np.einsum("nrq,nrqt->nrt", vals[:, :, half::2], picked)
    dc = d_coords()
    out = full[:, dc[..., 0], dc[..., 1]].reshape(batch + (32, 4))
    return np.rint(out).astype(np.int64) if kind == "s8" else out


def byte_perm(x: int, y: int, selector: int) -> int:
    """CUDA ``__byte_perm(x, y, s)`` (no sign-replication mode): byte i of the result is byte ``s >> 4i & 7`` of y:x."""
    both = (int(y) << 32) | int(x)
    return sum(((both >> (8 * ((selector >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))


def kernel_metadata(kind: str, index_words: np.ndarray, chunk: int) -> np.ndarray:
    """E [32] as ``matmul_sparse24.cu`` builds it for instruction ``chunk`` (dense K ``chunk * MMA_K``) of a 16-row
    tile, from ``index_words`` [16, words] = the op's ``indices`` rows read as little-endian uint32."""
    E = np.zeros(32, dtype=np.uint32)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        if kind == "f16":
            E[lane] = byte_perm(index_words[g, chunk], index_words[g + 8, chunk], 0x7632 if t & 1 else 0x5410)
        else:  # one whole word: row g + 8 (t & 1), groups 8 (t >> 1) .. + 7 of the instruction's 16
            E[lane] = index_words[g + 8 * (t & 1), 2 * chunk + (t >> 1)]
    return E


# ---- probes: which register element reaches which output, measured with batches of raw mma.sp instructions ----
#
# Each ``*_probe_inputs`` returns stacked registers (A [n, 32, 4], B [n, 32, 4], E [n, 32] uint32) for n independent
# instructions; ``run(A, B, E) -> D [n, 32, 4]`` executes them (on a device: the ``probe`` launcher with
# ``count = n``; here: ``emulate``). The ``infer_*`` functions decode D under ``d_coords`` only (the accumulator
# layout, common to both kinds and confirmed by the passing f16 kernel), so each measures one operand's layout:
#
# - ``infer_b_map``: A all ones and every metadata nibble the same, so no A or E layout matters; a single B element
#   set to 1 shows up in the output column of its token, in every row, iff its K position (mod 4) is one the
#   nibble keeps. Gives each B element's token and k % 4 class.
# - ``infer_a_map``: a single A element set to 1, uniform nibble, B holding a code of each B register position; the
#   one non-zero output row is the element's row, and the codes in it name, per token, the B element it multiplied.
#   Gives each A element's row and (through b_coords) the dense k it met.
# - ``infer_metadata_map``: A all ones, B[k] coding k's group, one nibble changed: the (row, group) it controls.

UNIFORM_NIBBLES = (0x4, 0xE)  # (i0, i1) = (0, 1) and (2, 3): between them every K position is kept once


def _uniform_e(nibble: int) -> np.ndarray:
    return np.full(32, int(nibble) * 0x11111111, dtype=np.uint32)


def _reg_positions(kind: str) -> list[tuple[int, int, int]]:
    return [(lane, r, e) for lane in range(32) for r in range(4) for e in range(_per(kind))]


def _regs_with(kind: str, elems: np.ndarray, dtype) -> np.ndarray:
    """[..., 32, 4] uint32 registers from elements [..., P] in flat (lane, r, e) order, P = 32 * 4 * E."""
    elems = np.asarray(elems)
    return np.ascontiguousarray(elems.astype(dtype)).view(np.uint32).reshape(elems.shape[:-1] + (32, 4))


def _one_hot(kind: str, dtype) -> np.ndarray:
    """[P, 32, 4]: instruction q's registers are zero except element q = 1."""
    return _regs_with(kind, np.eye(32 * 4 * _per(kind)), dtype)


def _dtypes(kind: str):
    return (np.float16, np.float16) if kind == "f16" else (np.int8, np.uint8)


def _full(D: np.ndarray) -> np.ndarray:
    """D [n, 32, 4] -> [n, 16, 8] (row, token) under d_coords."""
    D = np.asarray(D, dtype=np.float64).reshape(-1, 32, 4)
    dc = d_coords()
    full = np.zeros((D.shape[0], 16, 8))
    full[:, dc[..., 0], dc[..., 1]] = D
    return full


def b_probe_inputs(kind: str):
    """One instruction per (B element, uniform nibble): A all ones, E uniform, B zero except that element = 1."""
    adt, bdt = _dtypes(kind)
    npos = 32 * 4 * _per(kind)
    u = len(UNIFORM_NIBBLES)
    A = np.broadcast_to(_regs_with(kind, np.ones(npos), adt), (u * npos, 32, 4))
    B = np.concatenate([_one_hot(kind, bdt)] * u)
    E = np.repeat(np.stack([_uniform_e(nb) for nb in UNIFORM_NIBBLES]), npos, axis=0)
    return np.ascontiguousarray(A), B, E


def infer_b_map(kind: str, run) -> np.ndarray:
    """[32, 4, E, 2] per B element: (token, k % 4 class) measured on ``run``: the class is 0 when the uniform
    nibble 0x4 (positions 0, 1) picks the element up, 2 when 0xE (positions 2, 3) does; -1 where the output was
    not one full column of ones."""
    per = _per(kind)
    npos = 32 * 4 * per
    full = _full(run(*b_probe_inputs(kind)))
    out = np.full((npos, 2), -1, dtype=np.int64)
    for u, cls in enumerate((0, 2)):
        for q in range(npos):
            f = full[u * npos + q]
            cols = np.nonzero(np.abs(f).max(axis=0) > 0.5)[0]
            if len(cols) == 1 and np.allclose(f[:, cols[0]], 1.0):
                if out[q, 0] >= 0:  # picked up by both nibbles: not a single K position
                    out[q] = (-1, -1)
                    continue
                out[q] = (cols[0], cls)
    return out.reshape(32, 4, per, 2)


def model_b_map(kind: str) -> np.ndarray:
    """What ``infer_b_map`` gives under this module's layouts."""
    bc = b_coords(kind)
    return np.stack([bc[..., 1], (bc[..., 0] % 4) & 2], axis=-1)


def _b_codes(kind: str) -> list:
    """B register contents coding each B element's flat position (f16: p + 1; u8: base-255 digits + 1, 2 runs)."""
    _, bdt = _dtypes(kind)
    p = np.arange(32 * 4 * _per(kind))
    if kind == "f16":
        return [_regs_with(kind, p + 1, bdt)]
    return [_regs_with(kind, p % 255 + 1, bdt), _regs_with(kind, p // 255 + 1, bdt)]


def a_probe_inputs(kind: str):
    """One instruction per (A element, uniform nibble, B code): A zero except that element = 1, E uniform."""
    adt, _ = _dtypes(kind)
    npos = 32 * 4 * _per(kind)
    codes = np.stack(_b_codes(kind))  # [code, 32, 4]
    u, c = len(UNIFORM_NIBBLES), len(codes)
    A = np.repeat(np.concatenate([_one_hot(kind, adt)] * u), c, axis=0)  # order: nibble, element, code
    B = np.tile(codes, (u * npos, 1, 1))
    E = np.repeat(np.stack([_uniform_e(nb) for nb in UNIFORM_NIBBLES]), npos * c, axis=0)
    return A, B, E


def infer_a_map(kind: str, run) -> tuple[np.ndarray, np.ndarray]:
    """Per A element, for each uniform nibble (0x4, 0xE): (row, k) [2, 32, 4, E, 2] measured on ``run``, k being
    the dense K position of the B element it multiplied as ``b_coords`` names that element, and a bool
    [2, 32, 4, E]: every token's output named a B element of the same k and of that token (False: B's layout
    differs from b_coords, or the output was not one row). -1 where undecodable."""
    per = _per(kind)
    npos = 32 * 4 * per
    ncode = len(_b_codes(kind))
    full = _full(run(*a_probe_inputs(kind))).reshape(len(UNIFORM_NIBBLES), npos, ncode, 16, 8)
    bc = b_coords(kind).reshape(npos, 2)
    out = np.full((len(UNIFORM_NIBBLES), npos, 2), -1, dtype=np.int64)
    consistent = np.zeros((len(UNIFORM_NIBBLES), npos), dtype=bool)
    for u in range(len(UNIFORM_NIBBLES)):
        for q in range(npos):
            f = full[u, q]  # [code, row, token]
            rows = np.nonzero(np.abs(f).max(axis=(0, 2)) > 0.5)[0]
            if len(rows) != 1:
                continue
            v = np.rint(f[:, rows[0], :]).astype(np.int64)  # [code, token]
            if (v < 1).any():
                continue
            pos = v[0] - 1 if ncode == 1 else (v[0] - 1) + 255 * (v[1] - 1)
            if (pos >= npos).any():
                continue
            ks, toks = bc[pos, 0], bc[pos, 1]
            out[u, q] = (rows[0], ks[0])
            consistent[u, q] = bool((ks == ks[0]).all() and (toks == np.arange(8)).all())
    return out.reshape(len(UNIFORM_NIBBLES), 32, 4, per, 2), consistent.reshape(len(UNIFORM_NIBBLES), 32, 4, per)


def model_a_map(kind: str) -> np.ndarray:
    """What ``infer_a_map`` gives (its first array) under this module's layouts."""
    ac = a_coords(kind)
    out = []
    for nibble in UNIFORM_NIBBLES:
        kept = (nibble & 3, nibble >> 2)
        c = ac[..., 1]
        k = 4 * (c // 2) + np.where(c % 2 == 0, kept[0], kept[1])
        out.append(np.stack([ac[..., 0], k], axis=-1))
    return np.stack(out)


def metadata_probe_inputs(kind: str, lane: int | None = None, nibble: int = 0):
    """Registers for mapping metadata on a device: A all ones, B[k, token] = 2 (k // 4 + 1) when k % 4 >= 2 else 0,
    every nibble (0, 1) except ``lane``'s ``nibble``, set to (2, 3). Then D[row] = 0 everywhere except the row whose
    group q the changed nibble controls, where it is 4 (q + 1) (f16: exact; s8: exact)."""
    K = MMA_K[kind]
    vals = np.ones((16, K // 2))
    k = np.arange(K)
    x = np.where(k % 4 >= 2, 2 * (k // 4 + 1), 0)[:, None] * np.ones((1, 8))
    if kind == "s8":
        vals, x = vals.astype(np.int8), x.astype(np.uint8)
    else:
        vals, x = vals.astype(np.float16), x.astype(np.float16)
    A, B, _ = lane_registers(kind, vals, np.full((16, K // 4), 0x4, np.uint8), x)
    E = np.full(32, 0x44444444, dtype=np.uint32)
    if lane is not None:
        E[lane] = (int(E[lane]) & ~(0xF << (4 * nibble))) | (0xE << (4 * nibble))
    return A, B, E


def infer_metadata_map(kind: str, run) -> np.ndarray:
    """[32, 8, 2] (row, group) that each lane's nibble controls on the device (-1: none); ``run(A, B, E) -> D`` runs
    a batch of ``mma.sp`` (the ``probe`` launcher with count = 256): one per (lane, nibble)."""
    inputs = [metadata_probe_inputs(kind, lane, j) for lane in range(32) for j in range(8)]
    full = _full(run(*(np.stack(x) for x in zip(*inputs)))).reshape(32, 8, 16, 8)
    out = np.full((32, 8, 2), -1, dtype=np.int64)
    for lane in range(32):
        for j in range(8):
            f = full[lane, j]
            rows = np.nonzero(np.abs(f).max(axis=1) > 0.5)[0]
            if len(rows) == 1:
                out[lane, j] = (rows[0], int(round(f[rows[0]].mean() / 4)) - 1)
    return out


# ---- ldmatrix (the tiled kernel, matmul_sparse24_tiled.cuh, loads its A and B fragments with ldmatrix.x4) ----


def ldmatrix_x4(smem: np.ndarray, addrs) -> np.ndarray:
    """``ldmatrix.sync.aligned.m8n8.x4.shared.b16`` on a byte array ``smem``: lane ``l`` supplies ``addrs[l]``, the
    address of row ``l % 8`` of matrix ``l // 8`` (16 contiguous bytes); register ``i`` of lane ``l`` is the
    little-endian word at bytes ``4 (l % 4)`` of row ``l // 4`` of matrix ``i``. Returns [32, 4] uint32 (PTX ISA,
    "Warp-level matrix load instruction: ldmatrix": thread ``l`` holds row ``l / 4``, elements ``2 (l % 4)``,
    ``+1`` of each 8 x 8 b16 matrix)."""
    smem = np.asarray(smem, dtype=np.uint8).reshape(-1)
    addrs = [int(a) for a in addrs]
    if len(addrs) != 32 or any(a % 16 for a in addrs):
        raise ValueError("ldmatrix takes 32 row addresses, each 16-byte aligned")
    out = np.zeros((32, 4), dtype=np.uint32)
    for lane in range(32):
        for i in range(4):
            a = addrs[8 * i + lane // 4] + 4 * (lane % 4)
            out[lane, i] = smem[a : a + 4].view("<u4")[0]
    return out


def bank_conflict_ways(addrs, width: int = 16) -> int:
    """Worst number of distinct 128-byte-row wavefronts any 4-byte bank is hit by, for one phase of 8 lanes each
    reading ``width`` bytes from ``addrs`` (1: conflict-free). ldmatrix.x4 runs 4 such phases (lanes 8i..8i+7)."""
    banks: dict[int, set] = {}
    for a in addrs:
        for w in range(0, width, 4):
            banks.setdefault(((int(a) + w) // 4) % 32, set()).add((int(a) + w) // 128)
    return max(len(v) for v in banks.values())


# ---- dense mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 (matmul_lowbit.cu's tensor-core path) ----
#
# PTX ISA "Matrix Fragments for mma.m16n8k16 with floating point type", g = lane >> 2, t = lane % 4:
#   A[r] (r = 0..3, two halves e, low first): row g + 8 (r & 1), col 2t + 8 (r >> 1) + e   (a_{2r}, a_{2r+1})
#   B[r] (r = 0, 1): k 2t + 8r + e, col (token) g
#   D[i]: row g + 8 (i >> 1), col 2t + (i & 1)   (d_coords above)


def _dense_a(e: int) -> np.ndarray:
    """[32, 4, e, 2] (row, k) of element j of each A register of a dense m16n8k(8e) mma with e elements per
    32-bit register (e = 2: f16 m16n8k16, e = 4: s8 m16n8k32): row g + 8 (r & 1), k e t + 4e (r >> 1) + j."""
    g, t = _LANES // 4, _LANES % 4
    out = np.zeros((32, 4, e, 2), dtype=np.int64)
    for r in range(4):
        for j in range(e):
            out[:, r, j, 0] = g + 8 * (r & 1)
            out[:, r, j, 1] = e * t + 4 * e * (r >> 1) + j
    return out


def _dense_b(e: int) -> np.ndarray:
    """[32, 2, e, 2] (k, column) of element j of each B register of the same mma: k e t + 4e r + j, column g."""
    g, t = _LANES // 4, _LANES % 4
    out = np.zeros((32, 2, e, 2), dtype=np.int64)
    for r in range(2):
        for j in range(e):
            out[:, r, j, 0] = e * t + 4 * e * r + j
            out[:, r, j, 1] = g
    return out


def _emulate(A, B, C, e: int, element, acc) -> np.ndarray:
    """D [..., 32, 4] of the dense m16n8k(8e) mma from per-lane registers A [..., 32, 4] and B [..., 32, 2] (uint32,
    e elements of dtype ``element`` each, low first), products and sums in dtype ``acc``, plus optional C."""
    A, B = np.asarray(A, dtype=np.uint32), np.asarray(B, dtype=np.uint32)
    a = np.ascontiguousarray(A).view(element).reshape(A.shape[:-2] + (32, 4, e)).astype(acc)
    b = np.ascontiguousarray(B).view(element).reshape(B.shape[:-2] + (32, 2, e)).astype(acc)
    am = np.zeros(A.shape[:-2] + (16, 8 * e), dtype=acc)
    bm = np.zeros(B.shape[:-2] + (8 * e, 8), dtype=acc)
    ac, bc = _dense_a(e), _dense_b(e)
    am[..., ac[..., 0], ac[..., 1]] = a
    bm[..., bc[..., 0], bc[..., 1]] = b
    full = am @ bm  # [..., 16, 8]
    dc = d_coords()
    D = full[..., dc[..., 0], dc[..., 1]]
    return D if C is None else D + np.asarray(C, dtype=acc)


def dense_a_coords() -> np.ndarray:
    """[32, 4, 2, 2] (row, k) of each half of each A register of the dense f16 m16n8k16."""
    return _dense_a(2)


def dense_b_coords() -> np.ndarray:
    """[32, 2, 2, 2] (k, token) of each half of each B register of the dense f16 m16n8k16."""
    return _dense_b(2)


def emulate_dense(A: np.ndarray, B: np.ndarray, C: np.ndarray | None = None) -> np.ndarray:
    """D [..., 32, 4] (float64) of the dense f16 m16n8k16 from per-lane registers A [..., 32, 4] and B [..., 32, 2]
    (uint32, two fp16 each, low half first) and optional C [..., 32, 4]; products and sums in float64."""
    return _emulate(A, B, C, 2, np.float16, np.float64)


# ---- dense mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 (attention_int8.cu's tensor-core Q.K^T) ----
#
# PTX ISA "Matrix Fragments for mma.m16n8k32" (integer types), g = lane >> 2, t = lane % 4:
#   A[r] (r = 0..3, four bytes e, low first): row g + 8 (r & 1), col 4t + 16 (r >> 1) + e   (a_{4r} .. a_{4r+3})
#   B[r] (r = 0, 1): k 4t + 16r + e, col g
#   D[i]: row g + 8 (i >> 1), col 2t + (i & 1)   (d_coords above; .s32)
# The sparse s8 A model above (the same pattern on the compressed 16 x 32 matrix) was measured on an H100.


def dense_s8_a_coords() -> np.ndarray:
    """[32, 4, 4, 2] (row, k) of each byte of each A register of the dense s8 m16n8k32."""
    return _dense_a(4)


def dense_s8_b_coords() -> np.ndarray:
    """[32, 2, 4, 2] (k, col) of each byte of each B register of the dense s8 m16n8k32."""
    return _dense_b(4)


def emulate_dense_s8(A: np.ndarray, B: np.ndarray, C: np.ndarray | None = None) -> np.ndarray:
    """D [..., 32, 4] (int64, exact) of the dense s8 m16n8k32 from per-lane registers A [..., 32, 4] and
    B [..., 32, 2] (uint32, four int8 each, low byte first) and optional C [..., 32, 4]."""
    return _emulate(A, B, C, 4, np.int8, np.int64)


def ldmatrix_x4_trans(smem: np.ndarray, addrs) -> np.ndarray:
    """``ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16`` on a byte array ``smem`` (vectorized): lane ``l`` supplies
    ``addrs[..., l]``, the address of row ``l % 8`` of matrix ``l // 8`` (16 contiguous bytes, 8 b16 elements);
    with ``.trans`` register ``i`` of lane ``l`` holds elements ``(2 (l % 4), l // 4)`` (low half) and
    ``(2 (l % 4) + 1, l // 4)`` (high half), (row, column), of matrix ``i``: the transpose of what ``ldmatrix_x4``
    gives. Returns [..., 32, 4] uint32."""
    smem = np.asarray(smem, dtype=np.uint8).reshape(-1)
    addrs = np.asarray(addrs, dtype=np.int64)
    if addrs.shape[-1] != 32 or (addrs % 16).any():
        raise ValueError("ldmatrix takes 32 row addresses, each 16-byte aligned")
    lane = _LANES
    i = np.arange(4)
    # element (row r, column col) of matrix i sits at bytes addrs[8 i + r] + 2 col .. + 1
    col = lane[:, None] // 4  # [32, 1]
    r_lo = 2 * (lane[:, None] % 4) + 0 * i  # [32, 4]
    base_lo = addrs[..., 8 * i[None, :] + r_lo] + 2 * col
    base_hi = addrs[..., 8 * i[None, :] + r_lo + 1] + 2 * col
    h = smem.view(np.uint16) if smem.size % 2 == 0 else smem[:-1].view(np.uint16)
    lo = h[base_lo // 2].astype(np.uint32)
    hi = h[base_hi // 2].astype(np.uint32)
    return lo | (hi << np.uint32(16))
