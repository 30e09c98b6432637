// The kernel-path switch of the CUDA libraries that have a CUDA-core and a tensor-core kernel for one op
// (matmul_lowbit.cu: $EDGEKIT_LOWBIT_PATH, attention_int8.cu: $EDGEKIT_ATTN_PATH): the mode comes from the
// environment variable (auto | old | mma, read at the first launch) or from the library's set_path entry point, and
// `last` records which kernel the last successful launch took. What "auto" means is each library's choice. Not
// thread-safe against concurrent launches (the libraries document the same).
#pragma once

#include <cstdlib>
#include <cstring>

namespace edgekit_path {

constexpr int kPathAuto = 0, kPathOld = 1, kPathMma = 2;

class PathSwitch {
 public:
  explicit PathSwitch(const char* env) : env_(env) {}

  int mode() {
    if (mode_ < 0) mode_ = parse(std::getenv(env_));
    return mode_;
  }

  // 0 auto, 1 the CUDA-core kernel, 2 the tensor-core kernel; -1 re-reads the variable. Returns the previous mode,
  // or -1 for an unknown mode (nothing changed).
  int set(int m) {
    if (m != -1 && m != kPathAuto && m != kPathOld && m != kPathMma) return -1;
    const int prev = mode();
    mode_ = m;
    return prev;
  }

  int last = 0;  // the path of the last successful launch: 1 CUDA-core kernel, 2 tensor-core kernel (0 before any)

 private:
  static int parse(const char* s) {
    if (s == nullptr || *s == 0) return kPathAuto;
    if (std::strcmp(s, "old") == 0) return kPathOld;
    if (std::strcmp(s, "mma") == 0) return kPathMma;
    return kPathAuto;
  }

  const char* env_;
  int mode_ = -1;
};

}  // namespace edgekit_path
