// Quantized weights expanded to bfloat16 rows, for matmuls of many tokens (prompt chunks, large
// batches): there the work is arithmetic, not bytes, and oneDNN's bfloat16 GEMM (AVX512_BF16
// dot products) runs ~3x float32's and well ahead of multiplying the codes one token group at a
// time. The caller expands a tile of rows, multiplies it, and reuses the buffer for the next.
//   shardserve_kernels::nf4_expand(packed, scale, levels, out): out[n][k] = levels[code] * scale
//     for the NF4 codes of layers/quant/dequant.py (two per byte, low nibble first, a float32
//     scale per group of 64 inputs), rounded to bfloat16 (nearest, ties to even).
//   shardserve_kernels::int8_expand(q, scale, out): out[n][k] = q[n][k] * scale[n], likewise.
// The product is computed in float32 as torch computes it, so each value equals the dequantized
// float32 weight cast to bfloat16. AVX-512 (F, BW); built beside gemv.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include "../bf16.h"

namespace {

constexpr int64_t kGroup = 64;

using shardserve::store_bf16;

__attribute__((target("avx512f,avx512bw,avx512vl"))) void nf4_row(const uint8_t* packed,
                                                                   const float* scale,
                                                                   const float* levels_in,
                                                                   uint16_t* out, int64_t K) {
  const __m512 levels = _mm512_loadu_ps(levels_in);
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int64_t g = 0; g < K / kGroup; ++g) {
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed + 32 * g));
    const __m256i lo = _mm256_and_si256(bytes, low);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
    // codes in input order: low nibble, high nibble, byte after byte (unpack works per lane)
    const __m256i a = _mm256_unpacklo_epi8(lo, hi), b = _mm256_unpackhi_epi8(lo, hi);
    const __m256i first = _mm256_permute2x128_si256(a, b, 0x20);   // inputs 0-31
    const __m256i second = _mm256_permute2x128_si256(a, b, 0x31);  // inputs 32-63
    const __m512 s = _mm512_set1_ps(scale[g]);
    const __m128i quarters[4] = {_mm256_castsi256_si128(first), _mm256_extracti128_si256(first, 1),
                                 _mm256_castsi256_si128(second),
                                 _mm256_extracti128_si256(second, 1)};
    for (int q = 0; q < 4; ++q) {
      const __m512 w = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(quarters[q]), levels);
      store_bf16(out + g * kGroup + 16 * q, _mm512_mul_ps(w, s));
    }
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) void int8_row(const int8_t* q, float scale,
                                                                   uint16_t* out, int64_t K) {
  const __m512 s = _mm512_set1_ps(scale);
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k));
    store_bf16(out + k, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)), s));
  }
  for (; k < K; ++k) out[k] = c10::BFloat16(float(q[k]) * scale).x;  // rounds as store_bf16
}

bool supported() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}

void check_out(const at::Tensor& out, int64_t N, int64_t K, const char* op) {
  TORCH_CHECK(supported(), op, ": needs AVX-512");
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.is_contiguous() && out.dim() == 2 &&
                  out.size(0) == N && out.size(1) == K,
              op, ": out must be a contiguous bfloat16 [", N, ", ", K, "]");
}

// rows split among threads, about 64 KiB of output per task
int64_t grain(int64_t K) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1)); }

void nf4_expand(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& levels,
                at::Tensor out) {
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  TORCH_CHECK(packed.scalar_type() == at::kByte && scale.scalar_type() == at::kFloat &&
                  levels.scalar_type() == at::kFloat && levels.numel() == 16,
              "nf4_expand: uint8 packed codes, float32 scales and 16 levels");
  TORCH_CHECK(K % kGroup == 0 && scale.dim() == 2 && scale.size(0) == N &&
                  scale.size(1) == K / kGroup,
              "nf4_expand: packed [N, K / 2], scale [N, K / 64]");
  check_out(out, N, K, "nf4_expand");
  const at::Tensor pc = packed.contiguous(), sc = scale.contiguous(), lc = levels.contiguous();
  const uint8_t* pp = pc.data_ptr<uint8_t>();
  const float* sp = sc.data_ptr<float>();
  const float* lp = lc.data_ptr<float>();
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, N, grain(K), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      nf4_row(pp + n * (K / 2), sp + n * (K / kGroup), lp, op + n * K, K);
  });
}

void int8_expand(const at::Tensor& q, const at::Tensor& scale, at::Tensor out) {
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK(q.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat &&
                  scale.numel() == N,
              "int8_expand: int8 q [N, K] and float32 scale [N]");
  check_out(out, N, K, "int8_expand");
  const at::Tensor qc = q.contiguous(), sc = scale.contiguous();
  const int8_t* qp = qc.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, N, grain(K), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) int8_row(qp + n * K, sp[n], op + n * K, K);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(shardserve_kernels, m) {
  m.def("nf4_expand(Tensor packed, Tensor scale, Tensor levels, Tensor(a!) out) -> ()");
  m.def("int8_expand(Tensor q, Tensor scale, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(shardserve_kernels, CPU, m) {
  m.impl("nf4_expand", &nf4_expand);
  m.impl("int8_expand", &int8_expand);
}
