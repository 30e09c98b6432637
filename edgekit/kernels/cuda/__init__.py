"""CUDA kernels of the ``ai.edgekit`` ops, their build/load helpers (``build``) and the ``mma.sp`` register model
(``mma_layout``)."""
