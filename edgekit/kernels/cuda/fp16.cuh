// fp16 <-> fp32 conversions by PTX (no cuda_fp16.h, so the kernels also build under NVRTC without its headers);
// shared by matmul_sparse24.cu and attention_int8.cu.
#pragma once

__device__ __forceinline__ float h2f(unsigned short h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ unsigned short f2h(float f) {
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}
