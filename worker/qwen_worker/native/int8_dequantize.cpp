// qaio::int8_dequantize: an int8 weight with a float scale per row as bfloat16, in one pass over it,
// for the calls with too many rows for int8_linear (a prompt, a sentiment pass): one oneDNN bf16 matmul
// follows. torch's own way, q.to(bf16) * scale, takes two passes and ~2.7x as long.
#include "int8_common.h"

#include <cstring>

namespace qaio {
namespace {

// bfloat16 bits of 16 (AVX-512) or 8 (AVX2) finite floats, rounded to nearest even as torch rounds.
AVX512 inline __m256i bf16_avx512(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

AVX2 inline __m128i bf16_avx2(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i top = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1));
}

AVX512 void dequantize_avx512(const int8_t* q, const float* scale, uint16_t* out, int64_t K, int64_t n, int64_t end) {
  const int64_t k16 = K & ~int64_t(15);
  for (; n < end; ++n) {
    const __m512 s = _mm512_set1_ps(scale[n]);
    const int8_t* row = q + n * K;
    uint16_t* o = out + n * K;
    for (int64_t k = 0; k < k16; k += 16) {
      const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k))));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + k), bf16_avx512(_mm512_mul_ps(w, s)));
    }
    if (k16 < K) {
      const __mmask16 tail = (__mmask16)((1u << (K - k16)) - 1u);
      const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(tail, row + k16)));
      _mm256_mask_storeu_epi16(o + k16, tail, bf16_avx512(_mm512_mul_ps(w, s)));
    }
  }
}

AVX2 void dequantize_avx2(const int8_t* q, const float* scale, uint16_t* out, int64_t K, int64_t n, int64_t end) {
  const int64_t k8 = K & ~int64_t(7);
  for (; n < end; ++n) {
    const __m256 s = _mm256_set1_ps(scale[n]);
    const int8_t* row = q + n * K;
    uint16_t* o = out + n * K;
    for (int64_t k = 0; k < k8; k += 8) {
      const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k))));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + k), bf16_avx2(_mm256_mul_ps(w, s)));
    }
    for (int64_t k = k8; k < K; ++k) {  // the same rounding, one at a time
      const float v = float(row[k]) * scale[n];
      uint32_t bits;
      std::memcpy(&bits, &v, sizeof bits);
      o[k] = uint16_t((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
    }
  }
}

}  // namespace

at::Tensor int8_dequantize(const at::Tensor& q, const at::Tensor& scale, const std::string& isa) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat &&
              scale.numel() == q.size(0), "int8_dequantize: q [N, K] int8 and one float scale per row");
  check_isa(isa, "int8_dequantize");
  const auto qc = q.contiguous();
  const auto sc = scale.contiguous();
  const int64_t N = qc.size(0), K = qc.size(1);
  auto out = at::empty({N, K}, qc.options().dtype(at::kBFloat16));
  const int8_t* qp = qc.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const bool wide = isa == "avx512_vnni";
  at::parallel_for(0, N, 16, [&](int64_t n, int64_t end) {
    if (wide) dequantize_avx512(qp, sp, op, K, n, end);
    else dequantize_avx2(qp, sp, op, K, n, end);
  });
  return out;
}

}  // namespace qaio
