"""Custom-op kernels: packing formats, numpy references, and the Python side of native implementations.

Every module here imports with numpy only (no torch, no onnx at import time).

- ``lowbit``: the ``ai.edgekit::MatMulLowBit`` op (2/3/4/8-bit group-wise weights): specification, packing,
  numpy reference.
- ``sparse24``: the ``ai.edgekit::MatMulSparse24`` op: 2:4 structured-sparse weights as ``values [N, K/2]`` (fp32 /
  fp16, or int8 with a per-row ``w_scale``) plus ``indices`` uint8 ``[N, ceil(K/8)]`` (per group of 4 the nibble
  ``i0 | i1 << 2``, two per byte, low nibble first: little-endian 32-bit words are the rows' ``mma.sp`` metadata).
  int8 contract: ``Y = (A_u8 - a_zp) * a_scale @ (q * w_scale[n]).T`` with int32 sums. K a multiple of 4.
- ``attention``: the ``ai.edgekit::AttentionInt8`` op (SageAttention2-style): K and Q smoothed (mean over the
  sequence removed; the Q mean returns as an exact per-key bias), Q per-block and K per-block symmetric int8,
  int32 Q.K^T, fp32 softmax, fp16 P.V with fp32 accumulation; numpy references of the quantized op and of exact
  attention.
- ``ort_python``: a reference-speed ONNX Runtime implementation of MatMulLowBit through onnxruntime-extensions.
- ``cuda/``: the CUDA kernels (``matmul_lowbit.cu``, ``matmul_sparse24.cu`` with ``mma.sp`` on sm_80+ and a
  CUDA-core path before, ``attention_int8.cu``), how to compile and load them (``build.py``), and the numpy model
  of the ``mma.sp`` register fragments (``mma_layout.py``). ``runtimes/cuda/check_gpu.py`` checks them on a GPU.
"""
