// Shared by the int8 kernel's sources (int8_matmul.cpp, int8_dequantize.cpp): the instruction sets
// each function is compiled for (chosen at run time by int8_kernel.py, after a trial in a child).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>
#include <string>

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define AVX2 __attribute__((target("avx2,fma")))

namespace qaio {

inline void check_isa(const std::string& isa, const char* op) {
  TORCH_CHECK(isa == "avx512_vnni" || isa == "avx2", op, ": isa is avx512_vnni or avx2");
}

// q [N, K] int8 * scale [N] float32 as bfloat16, rounded to nearest even as torch rounds.
at::Tensor int8_dequantize(const at::Tensor& q, const at::Tensor& scale, const std::string& isa);

}  // namespace qaio
