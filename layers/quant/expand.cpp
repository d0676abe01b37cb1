// Quantized weights expanded to bfloat16 rows, for matmuls of many tokens (prompt chunks, large
// batches): there the work is arithmetic, not bytes, and oneDNN's bfloat16 GEMM (AVX512_BF16
// dot products) runs ~2x float32's and well ahead of multiplying the codes one token group at a
// time. The caller expands a tile of rows, multiplies it, and reuses the buffer for the next.
//   shardserve_kernels::nf4_blocks_expand(blocks, scales, levels, out): out[n][k] =
//     levels[code] * scale for the NF4 codes of layers/quant/dequant.py in blocks.cpp's
//     blocks of 16 rows (a float32 scale per row and group of 64 inputs), rounded to bfloat16
//     (nearest, ties to even).
//   shardserve_kernels::int8_expand(q, scale, out): out[n][k] = q[n][k] * scale[n], likewise;
//   int8_blocks_expand(blocks, scale, out) the same for int8 rows in blocks.cpp's blocks.
// The product is computed in float32 as torch computes it, so each value equals the dequantized
// float32 weight cast to bfloat16. AVX-512 (F, BW); built beside gemv.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstring>

#include "../bf16.h"

namespace {

constexpr int64_t kGroup = 64;

using shardserve::store_bf16;

// Two rows' 8 codes (a 128-bit lane of the unpacked run) to bfloat16 at out[r0], out[r0 + 1].
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"), always_inline)) inline void two_rows(
    __m128i codes, __m512 levels, float s0, float s1, uint16_t* out, int64_t K) {
  const __m512 w = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(codes), levels);
  const __m512 s = _mm512_insertf32x8(_mm512_set1_ps(s0), _mm256_set1_ps(s1), 1);
  const __m256i b = shardserve::to_bf16(_mm512_mul_ps(w, s));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(b));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + K), _mm256_extracti128_si256(b, 1));
}

// One block of 16 rows (blocks.cpp's layout) to bfloat16 rows out[0..15][0..K).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void nf4_block(
    const uint8_t* codes, const float* scales, const float* levels_in, uint16_t* out, int64_t K) {
  const __m512 levels = _mm512_loadu_ps(levels_in);
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t g = 0; g < K / kGroup; ++g) {
    const float* s = scales + g * 16;
    for (int k = 0; k < 8; ++k) {
      const __m512i bytes = _mm512_loadu_si512(codes + g * 512 + 64 * k);
      const __m512i lo = _mm512_and_si512(bytes, low);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low);
      // per 128-bit lane L: rows 4L and 4L + 1 (a), 4L + 2 and 4L + 3 (b), 8 codes each
      const __m512i a = _mm512_unpacklo_epi32(lo, hi), b = _mm512_unpackhi_epi32(lo, hi);
      uint16_t* o = out + g * kGroup + 8 * k;
      two_rows(_mm512_extracti32x4_epi32(a, 0), levels, s[0], s[1], o, K);
      two_rows(_mm512_extracti32x4_epi32(b, 0), levels, s[2], s[3], o + 2 * K, K);
      two_rows(_mm512_extracti32x4_epi32(a, 1), levels, s[4], s[5], o + 4 * K, K);
      two_rows(_mm512_extracti32x4_epi32(b, 1), levels, s[6], s[7], o + 6 * K, K);
      two_rows(_mm512_extracti32x4_epi32(a, 2), levels, s[8], s[9], o + 8 * K, K);
      two_rows(_mm512_extracti32x4_epi32(b, 2), levels, s[10], s[11], o + 10 * K, K);
      two_rows(_mm512_extracti32x4_epi32(a, 3), levels, s[12], s[13], o + 12 * K, K);
      two_rows(_mm512_extracti32x4_epi32(b, 3), levels, s[14], s[15], o + 14 * K, K);
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

// One block of 16 int8 rows (blocks.cpp's layout, bytes offset by 128) to bfloat16 rows.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void int8_block(
    const uint8_t* bytes, const float* scale, uint16_t* out, int64_t K) {
  __m512 s[4];  // rows 4i..4i+3, each scale four times: a quarter run's 16 values
  for (int i = 0; i < 4; ++i)
    s[i] = _mm512_permutexvar_ps(
        _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0),
        _mm512_castps128_ps512(_mm_loadu_ps(scale + 4 * i)));
  const __m512i bias = _mm512_set1_epi32(128);
  for (int64_t g = 0; g < K / kGroup; ++g) {
    for (int k = 0; k < 16; ++k) {
      const uint8_t* run = bytes + g * 1024 + 64 * k;
      uint16_t* o = out + g * kGroup + 4 * k;
      for (int i = 0; i < 4; ++i) {  // rows 4i..4i+3, inputs 4k..4k+3 of the group
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(run + 16 * i));
        const __m512i q = _mm512_sub_epi32(_mm512_cvtepu8_epi32(v), bias);
        const __m256i b = shardserve::to_bf16(_mm512_mul_ps(_mm512_cvtepi32_ps(q), s[i]));
        alignas(32) uint64_t four[4];
        _mm256_store_si256(reinterpret_cast<__m256i*>(four), b);
        for (int r = 0; r < 4; ++r)
          std::memcpy(o + (4 * i + r) * K, &four[r], sizeof(uint64_t));
      }
    }
  }
}

bool supported() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

void check_out(const at::Tensor& out, int64_t N, int64_t K, const char* op) {
  TORCH_CHECK(supported(), op, ": needs AVX-512");
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.is_contiguous() && out.dim() == 2 &&
                  out.size(0) == N && out.size(1) == K,
              op, ": out must be a contiguous bfloat16 [", N, ", ", K, "]");
}

// rows split among threads, about 64 KiB of output per task
int64_t grain(int64_t K) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1)); }

void nf4_blocks_expand(const at::Tensor& blocks, const at::Tensor& scales,
                       const at::Tensor& levels, at::Tensor out) {
  TORCH_CHECK(blocks.scalar_type() == at::kByte && scales.scalar_type() == at::kFloat &&
                  levels.scalar_type() == at::kFloat && levels.numel() == 16 &&
                  blocks.dim() == 5 && scales.dim() == 3,
              "nf4_blocks_expand: uint8 blocks [N / 16, K / 64, 8, 16, 4], float32 scales "
              "[N / 16, K / 64, 16] and 16 levels");
  const int64_t NB = blocks.size(0), K = blocks.size(1) * kGroup;
  check_out(out, NB * 16, K, "nf4_blocks_expand");
  const at::Tensor bc = blocks.contiguous(), sc = scales.contiguous(), lc = levels.contiguous();
  const uint8_t* bp = bc.data_ptr<uint8_t>();
  const float* sp = sc.data_ptr<float>();
  const float* lp = lc.data_ptr<float>();
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      nf4_block(bp + b * (K / 2) * 16, sp + b * (K / kGroup) * 16, lp, op + b * 16 * K, K);
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

void int8_blocks_expand(const at::Tensor& blocks, const at::Tensor& scale, at::Tensor out) {
  TORCH_CHECK(blocks.scalar_type() == at::kByte && scale.scalar_type() == at::kFloat &&
                  blocks.dim() == 5 && blocks.size(2) == 16 && scale.numel() == blocks.size(0) * 16,
              "int8_blocks_expand: uint8 blocks [N / 16, K / 64, 16, 16, 4], float32 scale [N]");
  const int64_t NB = blocks.size(0), K = blocks.size(1) * kGroup;
  check_out(out, NB * 16, K, "int8_blocks_expand");
  const at::Tensor bc = blocks.contiguous(), sc = scale.contiguous();
  const uint8_t* bp = bc.data_ptr<uint8_t>();
  const float* sp = sc.data_ptr<float>();
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) int8_block(bp + b * K * 16, sp + b * 16, op + b * 16 * K, K);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(shardserve_kernels, m) {
  m.def("int8_expand(Tensor q, Tensor scale, Tensor(a!) out) -> ()");
  m.def("nf4_blocks_expand(Tensor blocks, Tensor scales, Tensor levels, Tensor(a!) out) -> ()");
  m.def("int8_blocks_expand(Tensor blocks, Tensor scale, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(shardserve_kernels, CPU, m) {
  m.impl("int8_expand", &int8_expand);
  m.impl("nf4_blocks_expand", &nf4_blocks_expand);
  m.impl("int8_blocks_expand", &int8_blocks_expand);
}
