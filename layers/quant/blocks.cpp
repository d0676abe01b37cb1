// Quantized weights multiplied in bytes, 16 output rows at a time (decode steps, mixed steps
// and prompts of up to a few hundred tokens):
//   shardserve_kernels::nf4_blocks_linear(x, blocks, scales, levels) = x @ W.T
//     x float32 [M, K]; blocks uint8 [N / 16, K / 64, 8, 16, 4]: for each 16 rows and
//     group of 64 inputs, 8 runs of 64 bytes; byte (r, b) of run k holds row r's codes of
//     inputs 8k + b (low nibble) and 8k + 4 + b (high nibble); scales float32 [N / 16, K / 64,
//     16], the rows' group scales; levels the 16 NF4 levels (layers/quant/dequant.py: `to_blocks`
//     lays codes out so, `nf4_codes` back).
// In bytes, as llama.cpp multiplies its 4-bit blocks: levels rounded to int8 steps of 1/127 (one
// vpshufb turns 64 codes into weight bytes), each token's inputs rounded per group of 64 twice
// over (the value, then its rounding error in 128ths of a step: ~15 bits in all), exact integer
// sums. Laid out so that each vpdpbusd lane is one output row: per 64 bytes of codes one vpshufb
// pair and four vpdpbusd per token, and one conversion and multiply-add per group for 16 rows at
// once, where a row-by-row kernel spends one per group and row (it ran at 7-10 GB/s a core,
// bound by that arithmetic).
//   shardserve_kernels::int8_blocks_linear(x, blocks, scale) = (x @ Q.T) * scale
//     the same for `ifq`'s int8 rows Q [N, K] (one float32 scale per row, [N]): blocks uint8
//     [N / 16, K / 64, 16, 16, 4], byte (r, b) of run k of a group holding Q[r][64 g + 4 k + b]
//     + 128 (layers/quant/int8.py: `to_blocks`). Per 64 bytes one load and two vpdpbusd per
//     token: the NF4 kernel's arithmetic per weight, without its lookups.
// AVX-512 VNNI; built with gemv.cpp by shards/kernels.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kGroup = 64;
constexpr int64_t kRows = 16;
constexpr int64_t kTokens = 4;  // per pass over a block: 4 accumulators each, 16 in all
constexpr float kQmax = 127.0f;
constexpr float kTiny = 1e-30f;

// One token's inputs, per group of 64 in input order: codes of the value (hi) and of its
// rounding error in 128ths of a step (lo), the group's step, and -128 * (128 sum(hi) + sum(lo)),
// which takes the weights' +128 offset back out of the sums.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void quantize_token(
    const float* x, int64_t K, int8_t* hi, int8_t* lo, int32_t* offset, float* step) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  for (int64_t g = 0; g < K / kGroup; ++g) {
    const float* xg = x + g * kGroup;
    __m512 v[4];
    __m512 vmax = _mm512_setzero_ps();
    for (int q = 0; q < 4; ++q) {
      v[q] = _mm512_loadu_ps(xg + 16 * q);
      vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v[q]));
    }
    const float s = std::max(_mm512_reduce_max_ps(vmax), kTiny) / kQmax;
    step[g] = s;
    const __m512 inv = _mm512_set1_ps(1.0f / s);
    __m512i sums = _mm512_setzero_si512();
    for (int q = 0; q < 4; ++q) {
      const __m512 u = _mm512_mul_ps(v[q], inv);
      const __m512 h = _mm512_roundscale_ps(u, kRound);
      const __m512i hc = _mm512_cvtps_epi32(h);
      const __m512i lc = _mm512_cvtps_epi32(
          _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(u, h), _mm512_set1_ps(128.0f)), kRound));
      sums = _mm512_add_epi32(sums, _mm512_add_epi32(_mm512_slli_epi32(hc, 7), lc));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + g * kGroup + 16 * q), _mm512_cvtsepi32_epi8(hc));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + g * kGroup + 16 * q), _mm512_cvtsepi32_epi8(lc));
    }
    offset[g] = -128 * _mm512_reduce_add_epi32(sums);
  }
}

struct Tokens {
  const int8_t* hi;       // [M][K]
  const int8_t* lo;       // [M][K]
  const int32_t* offset;  // [M][G]
  const float* step;      // [M][G], already divided by 127 * 128
};

// One token's sums over a group for 16 rows, from its two accumulator chains per pass:
// 128 * (w . hi) + w . lo, less the weights' +128 offset; exact in int32, as float rounded past
// 2^24 (relative 6e-8).
__attribute__((target("avx512f"), always_inline)) inline __m512 group_dot(
    __m512i hi, __m512i hi2, __m512i lo, __m512i lo2, int32_t offset) {
  const __m512i h = _mm512_add_epi32(hi, hi2), l = _mm512_add_epi32(lo, lo2);
  return _mm512_cvtepi32_ps(
      _mm512_add_epi32(_mm512_add_epi32(_mm512_slli_epi32(h, 7), l), _mm512_set1_epi32(offset)));
}

// 16 rows against M tokens: y[m][0..15] for the block's rows.
template <int M>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void block_rows(
    const Tokens& t, int64_t m0, const uint8_t* codes, const float* scales, const uint8_t* lut,
    int64_t K, float* y, int64_t N) {
  const int64_t G = K / kGroup;
  const __m512i table = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lut)));
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 total[M];
  for (int m = 0; m < M; ++m) total[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    // two chains per pass (the runs' low and high nibbles): each vpdpbusd waits on one less
    __m512i acc_hi[M], acc_lo[M], acc_hi2[M], acc_lo2[M];
    for (int m = 0; m < M; ++m)
      acc_hi[m] = acc_lo[m] = acc_hi2[m] = acc_lo2[m] = _mm512_setzero_si512();
    const uint8_t* run = codes + g * (8 * 64);
    for (int k = 0; k < 8; ++k) {
      const __m512i bytes = _mm512_loadu_si512(run + 64 * k);
      const __m512i w0 = _mm512_shuffle_epi8(table, _mm512_and_si512(bytes, low));
      const __m512i w1 = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low));
      const int64_t at = g * kGroup + 8 * k;
      for (int m = 0; m < M; ++m) {
        const int8_t* h = t.hi + (m0 + m) * K + at;
        const int8_t* l = t.lo + (m0 + m) * K + at;
        acc_hi[m] = _mm512_dpbusd_epi32(acc_hi[m], w0, _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(h)));
        acc_hi2[m] = _mm512_dpbusd_epi32(acc_hi2[m], w1, _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(h + 4)));
        acc_lo[m] = _mm512_dpbusd_epi32(acc_lo[m], w0, _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(l)));
        acc_lo2[m] = _mm512_dpbusd_epi32(acc_lo2[m], w1, _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(l + 4)));
      }
    }
    const __m512 ws = _mm512_loadu_ps(scales + g * kRows);
    for (int m = 0; m < M; ++m) {
      const int64_t mg = (m0 + m) * G + g;
      const __m512 dot = group_dot(acc_hi[m], acc_hi2[m], acc_lo[m], acc_lo2[m], t.offset[mg]);
      total[m] = _mm512_fmadd_ps(dot, _mm512_mul_ps(ws, _mm512_set1_ps(t.step[mg])), total[m]);
    }
  }
  for (int m = 0; m < M; ++m) _mm512_storeu_ps(y + (m0 + m) * N, total[m]);
}

// int8 rows: 16 rows against M tokens, the group's sums scaled by the token's step only (the
// rows' scales multiply the totals once at the end).
template <int M>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void int8_block_rows(
    const Tokens& t, int64_t m0, const uint8_t* codes, const float* row_scale, int64_t K,
    float* y, int64_t N) {
  const int64_t G = K / kGroup;
  __m512 total[M];
  for (int m = 0; m < M; ++m) total[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i acc_hi[M], acc_lo[M], acc_hi2[M], acc_lo2[M];
    for (int m = 0; m < M; ++m)
      acc_hi[m] = acc_lo[m] = acc_hi2[m] = acc_lo2[m] = _mm512_setzero_si512();
    const uint8_t* run = codes + g * (16 * 64);
    for (int k = 0; k < 16; k += 2) {
      const __m512i w0 = _mm512_loadu_si512(run + 64 * k);
      const __m512i w1 = _mm512_loadu_si512(run + 64 * (k + 1));
      const int64_t at = g * kGroup + 4 * k;
      for (int m = 0; m < M; ++m) {
        const int8_t* h = t.hi + (m0 + m) * K + at;
        const int8_t* l = t.lo + (m0 + m) * K + at;
        acc_hi[m] = _mm512_dpbusd_epi32(acc_hi[m], w0, _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(h)));
        acc_hi2[m] = _mm512_dpbusd_epi32(acc_hi2[m], w1, _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(h + 4)));
        acc_lo[m] = _mm512_dpbusd_epi32(acc_lo[m], w0, _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(l)));
        acc_lo2[m] = _mm512_dpbusd_epi32(acc_lo2[m], w1, _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(l + 4)));
      }
    }
    for (int m = 0; m < M; ++m) {
      const int64_t mg = (m0 + m) * G + g;
      const __m512 dot = group_dot(acc_hi[m], acc_hi2[m], acc_lo[m], acc_lo2[m], t.offset[mg]);
      total[m] = _mm512_fmadd_ps(dot, _mm512_set1_ps(t.step[mg]), total[m]);
    }
  }
  const __m512 rs = _mm512_loadu_ps(row_scale);
  for (int m = 0; m < M; ++m) _mm512_storeu_ps(y + (m0 + m) * N, _mm512_mul_ps(total[m], rs));
}

using Int8BlockFn = void (*)(const Tokens&, int64_t, const uint8_t*, const float*, int64_t, float*,
                             int64_t);

Int8BlockFn pick_int8(int64_t rows) {
  switch (rows) {
    case 1: return int8_block_rows<1>;
    case 2: return int8_block_rows<2>;
    case 3: return int8_block_rows<3>;
    default: return int8_block_rows<4>;
  }
}

using BlockFn = void (*)(const Tokens&, int64_t, const uint8_t*, const float*, const uint8_t*, int64_t,
                         float*, int64_t);

BlockFn pick(int64_t rows) {
  switch (rows) {
    case 1: return block_rows<1>;
    case 2: return block_rows<2>;
    case 3: return block_rows<3>;
    case 4: return block_rows<4>;
    default: return block_rows<4>;
  }
}

// Every token of x rounded as `quantize_token` rounds it; steps divided by `divide`.
struct RoundedTokens {
  std::vector<int8_t> hi, lo;
  std::vector<int32_t> offset;
  std::vector<float> step;
  RoundedTokens(const at::Tensor& x, float divide) {
    const int64_t M = x.size(0), K = x.size(1), G = K / kGroup;
    hi.resize(M * K), lo.resize(M * K), offset.resize(M * G), step.resize(M * G);
    for (int64_t m = 0; m < M; ++m)
      quantize_token(x.data_ptr<float>() + m * K, K, hi.data() + m * K, lo.data() + m * K,
                     offset.data() + m * G, step.data() + m * G);
    for (float& s : step) s /= divide;
  }
  Tokens tokens() const { return Tokens{hi.data(), lo.data(), offset.data(), step.data()}; }
};

// Each block of 16 rows against every token, kTokens at a time while the block's bytes stay in
// L1: block(b, m0, m) computes tokens m0 .. m0 + m of block b.
template <typename F>
void over_blocks(int64_t M, int64_t NB, F&& block) {
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t m0 = 0; m0 < M; m0 += kTokens) block(b, m0, std::min(kTokens, M - m0));
  });
}

bool supported() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

at::Tensor nf4_blocks_linear(const at::Tensor& x, const at::Tensor& blocks, const at::Tensor& scales,
                             const at::Tensor& levels) {
  TORCH_CHECK(supported(), "nf4_blocks_linear: needs AVX-512 VNNI");
  TORCH_CHECK(x.scalar_type() == at::kFloat && blocks.scalar_type() == at::kByte &&
                  scales.scalar_type() == at::kFloat && levels.scalar_type() == at::kFloat &&
                  levels.numel() == 16,
              "nf4_blocks_linear: float32 x, uint8 blocks, float32 scales and 16 levels");
  TORCH_CHECK(x.dim() == 2 && blocks.dim() == 5 && blocks.size(2) == 8 && blocks.size(3) == kRows &&
                  blocks.size(4) == 4 && x.size(1) == blocks.size(1) * kGroup &&
                  scales.dim() == 3 && scales.size(0) == blocks.size(0) &&
                  scales.size(1) == blocks.size(1) && scales.size(2) == kRows,
              "nf4_blocks_linear: x [M, K], blocks [N / 16, K / 64, 8, 16, 4], scales [N / 16, K / 64, 16]");
  const int64_t M = x.size(0), K = x.size(1), NB = blocks.size(0), N = NB * kRows, G = K / kGroup;
  const at::Tensor xc = x.contiguous(), bc = blocks.contiguous(), sc = scales.contiguous();
  const at::Tensor lc = levels.contiguous();
  RoundedTokens r(xc, kQmax * 128.0f);  // levels in steps of 1/127, sums in 128ths
  uint8_t lut[16];  // levels as int8 steps of 1/127, offset by 128 (VNNI's unsigned operand)
  for (int i = 0; i < 16; ++i)
    lut[i] = uint8_t(int(std::nearbyint(lc.data_ptr<float>()[i] * kQmax)) + 128);
  at::Tensor y = at::empty({M, N}, x.options());
  const Tokens t = r.tokens();
  const uint8_t* bp = bc.data_ptr<uint8_t>();
  const float* sp = sc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  over_blocks(M, NB, [&](int64_t b, int64_t m0, int64_t m) {
    pick(m)(t, m0, bp + b * G * 512, sp + b * G * kRows, lut, K, yp + b * kRows, N);
  });
  return y;
}

at::Tensor int8_blocks_linear(const at::Tensor& x, const at::Tensor& blocks, const at::Tensor& scale) {
  TORCH_CHECK(supported(), "int8_blocks_linear: needs AVX-512 VNNI");
  TORCH_CHECK(x.scalar_type() == at::kFloat && blocks.scalar_type() == at::kByte &&
                  scale.scalar_type() == at::kFloat,
              "int8_blocks_linear: float32 x, uint8 blocks and float32 scale");
  TORCH_CHECK(x.dim() == 2 && blocks.dim() == 5 && blocks.size(2) == 16 && blocks.size(3) == kRows &&
                  blocks.size(4) == 4 && x.size(1) == blocks.size(1) * kGroup &&
                  scale.numel() == blocks.size(0) * kRows,
              "int8_blocks_linear: x [M, K], blocks [N / 16, K / 64, 16, 16, 4], scale [N]");
  const int64_t M = x.size(0), K = x.size(1), NB = blocks.size(0), N = NB * kRows, G = K / kGroup;
  const at::Tensor xc = x.contiguous(), bc = blocks.contiguous(), sc = scale.contiguous();
  RoundedTokens r(xc, 128.0f);  // weights are the integers themselves, sums in 128ths
  at::Tensor y = at::empty({M, N}, x.options());
  const Tokens t = r.tokens();
  const uint8_t* bp = bc.data_ptr<uint8_t>();
  const float* sp = sc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  over_blocks(M, NB, [&](int64_t b, int64_t m0, int64_t m) {
    pick_int8(m)(t, m0, bp + b * G * 1024, sp + b * kRows, K, yp + b * kRows, N);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(shardserve_kernels, m) {
  m.def("nf4_blocks_linear(Tensor x, Tensor blocks, Tensor scales, Tensor levels) -> Tensor");
  m.def("int8_blocks_linear(Tensor x, Tensor blocks, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(shardserve_kernels, CPU, m) {
  m.impl("nf4_blocks_linear", &nf4_blocks_linear);
  m.impl("int8_blocks_linear", &int8_blocks_linear);
}
