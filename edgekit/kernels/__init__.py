"""Custom-op kernels: packing formats, numpy references, and the Python side of native implementations.

- ``lowbit``: the ``ai.edgekit::MatMulLowBit`` op (2/3/4/8-bit group-wise weights): specification, packing,
  numpy reference. Imports with numpy only (no torch, no onnx at import time).
- ``ort_python``: a reference-speed ONNX Runtime implementation of the same op through onnxruntime-extensions.
- ``cuda/``: the CUDA kernel (``matmul_lowbit.cu``) and how to compile and load it (``build.py``).
"""
