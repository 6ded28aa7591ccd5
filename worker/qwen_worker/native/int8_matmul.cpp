// qaio::int8_linear: y[M, N] = x[M, K] . (q[N, K] * scale[N])^T, q int8 with a float scale per row,
// for the few rows of a decode step (int8_linear.py, QAIO_DTYPE=int8 on a CPU).
//
// Why our own: torch's int8 weight-packed matmul converts every weight to float and multiplies in
// float, which at one row is bound by that arithmetic (~11 GB/s of weights on two Xeon cores) rather
// than by memory (~22). Here each row of x is quantised to int16 with one scale (65,534 steps: its
// error is a small fraction of the int8 weights'), and int16 x int8 products are summed in int32 by
// AVX-512 VNNI (vpdpwssd: 32 products per instruction) or AVX2 (vpmaddwd), a chunk of columns at a
// time so that no int32 lane can overflow, then in float. Built by int8_kernel.py (with int8_dequantize.cpp); the
// ISA is chosen there by trying it in a child process.
#include "int8_common.h"

#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

namespace qaio {
namespace {

// Columns summed in int32 before the sum moves to float: each instruction adds two products of at most
// 32767 * 127 to a lane, so a lane may take at most 258 steps (2^31 / 8.3e6); chunks are 128 steps, of
// 32 columns for vpdpwssd and of 16 for vpmaddwd.
constexpr int64_t CHUNK_AVX512 = 4096;
constexpr int64_t CHUNK_AVX2 = 2048;
constexpr int PREFETCH_BYTES = 512;

// ---- AVX-512 VNNI ----

// Sums over columns [c, end) of RB rows of x (int16, Kp apart) against NB rows of q, added into out.
template <int RB, int NB>
AVX512 inline __attribute__((always_inline))
void chunk_avx512(const int16_t* x, int64_t Kp, const int8_t* q, int64_t K, int64_t c, int64_t end,
                  float (&out)[RB][NB]) {
  const int64_t k32 = K & ~int64_t(31);
  __m512i acc[RB][NB];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_setzero_si512();
  for (int64_t k = c; k < end; k += 32) {
    __m512i w[NB];
    for (int j = 0; j < NB; ++j) {
      const int8_t* p = q + j * K + k;
      if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(p) + PREFETCH_BYTES, _MM_HINT_T0);
      w[j] = _mm512_cvtepi8_epi16(k < k32 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                          : _mm256_maskz_loadu_epi8((__mmask32)((1ull << (K - k32)) - 1), p));
    }
    for (int r = 0; r < RB; ++r) {
      const __m512i xv = _mm512_loadu_si512(x + r * Kp + k);  // zero-padded past K
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_dpwssd_epi32(acc[r][j], w[j], xv);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < NB; ++j) out[r][j] += _mm512_reduce_add_ps(_mm512_cvtepi32_ps(acc[r][j]));
}

template <int RB, int NB>
AVX512 void block_avx512(const int16_t* x, const float* xs, int64_t Kp, const int8_t* q, int64_t K,
                         const float* scale, float* y, int64_t N) {
  float out[RB][NB] = {};
  for (int64_t c = 0; c < K; c += CHUNK_AVX512)
    chunk_avx512<RB, NB>(x, Kp, q, K, c, std::min(K, c + CHUNK_AVX512), out);
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < NB; ++j) y[r * N + j] = out[r][j] * xs[r] * scale[j];
}

// ---- AVX2 ----

template <int RB, int NB>
AVX2 inline __attribute__((always_inline))
void chunk_avx2(const int16_t* x, int64_t Kp, const int8_t* q, int64_t K, int64_t c, int64_t end,
                float (&out)[RB][NB]) {
  const int64_t k16 = K & ~int64_t(15);
  __m256i acc[RB][NB];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_setzero_si256();
  int64_t k = c;
  for (; k < std::min(end, k16); k += 16) {
    __m256i w[NB];
    for (int j = 0; j < NB; ++j) {
      const int8_t* p = q + j * K + k;
      if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(p) + PREFETCH_BYTES, _MM_HINT_T0);
      w[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    }
    for (int r = 0; r < RB; ++r) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + r * Kp + k));
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(w[j], xv));
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < NB; ++j) {
      alignas(32) int32_t lanes[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc[r][j]);
      float sum = 0.f;
      for (int i = 0; i < 8; ++i) sum += float(lanes[i]);
      for (int64_t t = k; t < end; ++t) sum += float(int32_t(x[r * Kp + t]) * int32_t(q[j * K + t]));  // K's tail
      out[r][j] += sum;
    }
}

template <int RB, int NB>
AVX2 void block_avx2(const int16_t* x, const float* xs, int64_t Kp, const int8_t* q, int64_t K,
                     const float* scale, float* y, int64_t N) {
  float out[RB][NB] = {};
  for (int64_t c = 0; c < K; c += CHUNK_AVX2) chunk_avx2<RB, NB>(x, Kp, q, K, c, std::min(K, c + CHUNK_AVX2), out);
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < NB; ++j) y[r * N + j] = out[r][j] * xs[r] * scale[j];
}

// ---- rows and output blocks, for either ISA ----

// Rows of x in groups of up to 4 pass over one block of NB weight rows (NB * K bytes, read from
// memory once and kept in L1/L2 while they pass).
#define DEFINE_RANGE(ISA, NB_WIDE)                                                                    \
  template <int NB>                                                                                   \
  ISA void rows_##ISA(const int16_t* x, const float* xs, int64_t M, int64_t Kp, const int8_t* q,      \
                      int64_t K, const float* scale, float* y, int64_t N) {                           \
    int64_t r = 0;                                                                                    \
    for (; r + 4 <= M; r += 4) block_##ISA<4, NB>(x + r * Kp, xs + r, Kp, q, K, scale, y + r * N, N); \
    switch (M - r) {                                                                                  \
      case 3: block_##ISA<3, NB>(x + r * Kp, xs + r, Kp, q, K, scale, y + r * N, N); break;           \
      case 2: block_##ISA<2, NB>(x + r * Kp, xs + r, Kp, q, K, scale, y + r * N, N); break;           \
      case 1: block_##ISA<1, NB>(x + r * Kp, xs + r, Kp, q, K, scale, y + r * N, N); break;           \
    }                                                                                                 \
  }                                                                                                   \
  ISA void range_##ISA(const int16_t* x, const float* xs, int64_t M, int64_t Kp, const int8_t* q,     \
                       int64_t K, const float* scale, float* y, int64_t N, int64_t n, int64_t end) {  \
    for (; n + NB_WIDE <= end; n += NB_WIDE)                                                          \
      rows_##ISA<NB_WIDE>(x, xs, M, Kp, q + n * K, K, scale + n, y + n, N);                           \
    for (; n < end; ++n) rows_##ISA<1>(x, xs, M, Kp, q + n * K, K, scale + n, y + n, N);              \
  }

#define avx512 AVX512
#define avx2 AVX2
DEFINE_RANGE(avx512, 4)
DEFINE_RANGE(avx2, 2)
#undef avx512
#undef avx2

// Each row of x as int16 with one scale (|x| <= 32767 * scale), zero-padded to Kp columns. A row with
// a value that is not finite gets a NaN scale: its outputs are NaN, as a float matmul's would be.
AVX512 void quantize_avx512(const float* x, int64_t M, int64_t K, int64_t Kp, int16_t* out, float* scales) {
  const int64_t k16 = K & ~int64_t(15);
  const __mmask16 tail = (__mmask16)((1u << (K - k16)) - 1u);
  for (int64_t r = 0; r < M; ++r) {
    const float* row = x + r * K;
    __m512 top = _mm512_setzero_ps(), poison = _mm512_setzero_ps();  // poison: NaN where a value is not finite
    for (int64_t k = 0; k < K; k += 16) {
      const __m512 v = k < k16 ? _mm512_loadu_ps(row + k) : _mm512_maskz_loadu_ps(tail, row + k);
      top = _mm512_max_ps(top, _mm512_abs_ps(v));
      poison = _mm512_add_ps(poison, _mm512_mul_ps(v, _mm512_setzero_ps()));
    }
    const float t = _mm512_reduce_max_ps(top);
    const bool finite = std::isfinite(t) && std::isfinite(_mm512_reduce_add_ps(poison));
    const float s = finite && t / 32767.f >= FLT_MIN ? t / 32767.f : 1.f;  // a tinier row rounds to 0
    const __m512 inv = _mm512_set1_ps(finite ? 1.f / s : 0.f);
    int16_t* o = out + r * Kp;
    for (int64_t k = 0; k < Kp; k += 16) {
      const __mmask16 m = k + 16 <= K ? (__mmask16)0xffff : k < K ? tail : (__mmask16)0;
      const __m512i i = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + k), inv));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + k), _mm512_cvtsepi32_epi16(i));
    }
    scales[r] = finite ? s : NAN;
  }
}

AVX2 void quantize_avx2(const float* x, int64_t M, int64_t K, int64_t Kp, int16_t* out, float* scales) {
  const int64_t k8 = K & ~int64_t(7);
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int64_t r = 0; r < M; ++r) {
    const float* row = x + r * K;
    __m256 top = _mm256_setzero_ps(), poison = _mm256_setzero_ps();
    for (int64_t k = 0; k < k8; k += 8) {
      const __m256 v = _mm256_loadu_ps(row + k);
      top = _mm256_max_ps(top, _mm256_and_ps(v, magnitude));
      poison = _mm256_add_ps(poison, _mm256_mul_ps(v, _mm256_setzero_ps()));
    }
    alignas(32) float lanes[8], bad[8];
    _mm256_store_ps(lanes, top);
    _mm256_store_ps(bad, poison);
    float t = 0.f, p = 0.f;
    for (int i = 0; i < 8; ++i) t = std::max(t, lanes[i]), p += bad[i];
    for (int64_t k = k8; k < K; ++k) t = std::max(t, std::fabs(row[k])), p += row[k] * 0.f;
    const bool finite = std::isfinite(t) && std::isfinite(p);
    const float s = finite && t / 32767.f >= FLT_MIN ? t / 32767.f : 1.f, inv = finite ? 1.f / s : 0.f;
    int16_t* o = out + r * Kp;
    for (int64_t k = 0; k < k8; k += 8) {
      const __m256i i = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(row + k), _mm256_set1_ps(inv)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + k),
                       _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1)));
    }
    for (int64_t k = k8; k < K; ++k) o[k] = int16_t(std::nearbyint(row[k] * inv));
    std::fill(o + K, o + Kp, int16_t(0));
    scales[r] = finite ? s : NAN;
  }
}

std::vector<std::string> isas() {
  std::vector<std::string> out;  // the CPU's report only: int8_kernel.py tries each before use
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
    out.emplace_back("avx512_vnni");
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) out.emplace_back("avx2");
  return out;
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const std::string& isa) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && x.size(1) == q.size(1), "int8_linear: x [M, K] and q [N, K]");
  TORCH_CHECK(q.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat && scale.numel() == q.size(0),
              "int8_linear: q int8 and one float scale per row of q");
  check_isa(isa, "int8_linear");
  const auto xf = x.to(at::kFloat).contiguous();
  const auto qc = q.contiguous();
  const auto sc = scale.contiguous();
  const int64_t M = xf.size(0), K = xf.size(1), N = qc.size(0), Kp = (K + 31) / 32 * 32;
  auto xq = at::empty({M, Kp}, xf.options().dtype(at::kShort));
  auto xs = at::empty({M}, xf.options());
  const bool wide = isa == "avx512_vnni";
  (wide ? quantize_avx512 : quantize_avx2)(xf.data_ptr<float>(), M, K, Kp, xq.data_ptr<int16_t>(), xs.data_ptr<float>());
  auto y = at::empty({M, N}, xf.options());
  const int16_t* xp = xq.data_ptr<int16_t>();
  const float* xsp = xs.data_ptr<float>();
  const int8_t* qp = qc.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Blocks of 4 output rows, a few per task: torch's own thread pool splits them (one OpenMP runtime:
  // this library's libgomp.so.1 is the one torch has loaded).
  at::parallel_for(0, (N + 3) / 4, 8, [&](int64_t b0, int64_t b1) {
    const int64_t n = b0 * 4, end = std::min(N, b1 * 4);
    if (wide) range_avx512(xp, xsp, M, Kp, qp, K, sp, yp, N, n, end);
    else range_avx2(xp, xsp, M, Kp, qp, K, sp, yp, N, n, end);
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace
}  // namespace qaio

TORCH_LIBRARY(qaio, m) {
  m.def("int8_linear(Tensor x, Tensor q, Tensor scale, str isa) -> Tensor");
  m.def("int8_dequantize(Tensor q, Tensor scale, str isa) -> Tensor");
  m.def("int8_isas() -> str[]", qaio::isas);
}
TORCH_LIBRARY_IMPL(qaio, CPU, m) {
  m.impl("int8_linear", qaio::int8_linear);
  m.impl("int8_dequantize", qaio::int8_dequantize);
}
