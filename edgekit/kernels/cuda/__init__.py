"""The CUDA implementation of MatMulLowBit: ``matmul_lowbit.cu`` and its build/load helpers in ``build``."""
