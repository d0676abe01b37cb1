// GEMVs for the few rows of a decode step, where torch's paths read quantized weights slowly:
//   shardserve_kernels::int8_mm(a, b): c[m][n] = sum_k a[m][k] * b[n][k] for int8 a [M, K] and
//     b [N, K], int32 c [M, N]: torch._int_mm(a, b.t()), exactly.
//   shardserve_kernels::int8_linear(x, b, scale): (x @ b.T) * scale for float32 x [M, K], as
//     layers/quant/int8.py `_two_pass` computes it: each row of x rounded to int8 twice over
//     (its value, then its rounding error, each on its own absmax / 127 grid), both multiplied
//     with b in exact int32 sums, recombined in float32. One call: no glue ops around it.
// b (the weights) streams from memory once, row by row, each row one sequential read that the
// hardware prefetcher follows; its K bytes stay in L1 while every row of a is multiplied in.
// b's values must lie in [-127, 127] (symmetric int8, as `ifq` stores them): the AVX2 path
// negates them. Built at first use by shards/kernels.py; a CPU without AVX2 is not served (the
// caller keeps torch's path).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kMaxRows = 16;

// -- AVX-512 VNNI ------------------------------------------------------------------------------
// vpdpbusd multiplies unsigned by signed bytes in groups of four: a's bytes come offset by 128
// (xor 0x80, done once per call) and 128 * sum(b) is taken off again, sum(b) coming from the
// same instruction with ones. Per lane: 4 * 255 * 127 per instruction, K / 64 instructions: no
// int32 overflow below K = 2^20.
template <int M, int U>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void row_vnni(
    const int8_t* a, const int8_t* b, int32_t* c, int64_t K, int64_t N) {
  __m512i acc[M][U];
  __m512i bsum[U];
  for (int u = 0; u < U; ++u) {
    bsum[u] = _mm512_setzero_si512();
    for (int m = 0; m < M; ++m) acc[m][u] = _mm512_setzero_si512();
  }
  const __m512i ones = _mm512_set1_epi8(1);
  const int64_t step = 64 * U;
  int64_t k = 0;
  for (; k + step <= K; k += step) {
    for (int u = 0; u < U; ++u) {
      const __m512i bv = _mm512_loadu_si512(b + k + 64 * u);
      bsum[u] = _mm512_dpbusd_epi32(bsum[u], ones, bv);
      for (int m = 0; m < M; ++m) {
        const __m512i au = _mm512_loadu_si512(a + m * K + k + 64 * u);
        acc[m][u] = _mm512_dpbusd_epi32(acc[m][u], au, bv);
      }
    }
  }
  for (; k < K; k += 64) {  // masked-off bytes are 0 on both sides: they add nothing
    const int64_t left = K - k;
    const __mmask64 mask = left >= 64 ? ~__mmask64(0) : ((__mmask64(1) << left) - 1);
    const __m512i bv = _mm512_maskz_loadu_epi8(mask, b + k);
    bsum[0] = _mm512_dpbusd_epi32(bsum[0], ones, bv);
    for (int m = 0; m < M; ++m) {
      const __m512i au = _mm512_maskz_loadu_epi8(mask, a + m * K + k);
      acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], au, bv);
    }
  }
  for (int u = 1; u < U; ++u) {
    bsum[0] = _mm512_add_epi32(bsum[0], bsum[u]);
    for (int m = 0; m < M; ++m) acc[m][0] = _mm512_add_epi32(acc[m][0], acc[m][u]);
  }
  const int32_t offset = 128 * _mm512_reduce_add_epi32(bsum[0]);
  for (int m = 0; m < M; ++m) c[m * N] = _mm512_reduce_add_epi32(acc[m][0]) - offset;
}

// -- AVX2 --------------------------------------------------------------------------------------
// vpmaddubsw multiplies unsigned by signed bytes into saturating int16 pairs: |a| times b with
// a's sign moved onto it keeps every pair within 2 * 128 * 127 < 2^15.
template <int M, int U>
__attribute__((target("avx2"))) void row_avx2(
    const int8_t* a, const int8_t* b, int32_t* c, int64_t K, int64_t N) {
  __m256i acc[M][U];
  for (int m = 0; m < M; ++m)
    for (int u = 0; u < U; ++u) acc[m][u] = _mm256_setzero_si256();
  const __m256i ones16 = _mm256_set1_epi16(1);
  const int64_t step = 32 * U;
  int64_t k = 0;
  for (; k + step <= K; k += step) {
    for (int u = 0; u < U; ++u) {
      const __m256i bv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + k + 32 * u));
      for (int m = 0; m < M; ++m) {
        const __m256i av =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + m * K + k + 32 * u));
        const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(av, av),
                                                   _mm256_sign_epi8(bv, av));
        acc[m][u] = _mm256_add_epi32(acc[m][u], _mm256_madd_epi16(pairs, ones16));
      }
    }
  }
  for (int m = 0; m < M; ++m) {
    __m256i s = acc[m][0];
    for (int u = 1; u < U; ++u) s = _mm256_add_epi32(s, acc[m][u]);
    const __m128i h = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    const __m128i q = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
    int32_t total = _mm_cvtsi128_si32(_mm_add_epi32(q, _mm_shuffle_epi32(q, 0xB1)));
    for (int64_t j = k; j < K; ++j) total += int32_t(a[m * K + j]) * int32_t(b[j]);
    c[m * N] = total;
  }
}

// -- rows of a in groups, rows of b split among threads ---------------------------------------
using RowFn = void (*)(const int8_t*, const int8_t*, int32_t*, int64_t, int64_t);

template <template <int, int> class Pick>
RowFn pick(int64_t rows) {
  // 4 unrolled accumulators per row of a while they fit the registers, 2 past 4 rows
  switch (rows) {
    case 1: return Pick<1, 4>::fn;
    case 2: return Pick<2, 4>::fn;
    case 3: return Pick<3, 4>::fn;
    case 4: return Pick<4, 4>::fn;
    case 5: return Pick<5, 2>::fn;
    case 6: return Pick<6, 2>::fn;
    case 7: return Pick<7, 2>::fn;
    default: return Pick<8, 2>::fn;
  }
}

template <int M, int U>
struct Vnni {
  static constexpr RowFn fn = row_vnni<M, U>;
};
template <int M, int U>
struct Avx2 {
  static constexpr RowFn fn = row_avx2<M, U>;
};

enum Isa : int64_t { kAuto = 0, kAvx2 = 1, kAvx512Vnni = 2 };

bool supported(int64_t isa) {
  if (isa == kAvx512Vnni)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  return isa == kAvx2 && __builtin_cpu_supports("avx2");
}

int64_t best_isa() {
  static const int64_t isa = supported(kAvx512Vnni) ? kAvx512Vnni
                             : supported(kAvx2)     ? kAvx2
                                                    : -1;
  return isa;
}

// -- the activations' two int8 passes ----------------------------------------------------------
// Exactly torch's `_two_pass` rounding: step = max(absmax, 1e-30) / 127, u = x / step (a true
// division), hi = round-half-even(u), lo = u - hi, and lo on its own grid the same way. The
// AVX-512 codes are written offset by 128, for VNNI.
constexpr float kQmax = 127.0f;
constexpr float kTiny = 1e-30f;

__attribute__((target("avx512f,avx512bw,avx512vl"))) void quantize_avx512(
    const float* x, int64_t K, int8_t* hi, int8_t* lo, float* lo_u, float* step, float* lo_step) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m512i flip = _mm512_set1_epi32(128);  // VNNI's unsigned bytes
  __m512 vmax = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mask = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
    vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_maskz_loadu_ps(mask, x + k)));
  }
  *step = std::max(_mm512_reduce_max_ps(vmax), kTiny) / kQmax;
  const __m512 vstep = _mm512_set1_ps(*step);
  __m512 lmax = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mask = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
    const __m512 u = _mm512_div_ps(_mm512_maskz_loadu_ps(mask, x + k), vstep);
    const __m512 h = _mm512_roundscale_ps(u, kRound);
    const __m512 l = _mm512_sub_ps(u, h);
    lmax = _mm512_max_ps(lmax, _mm512_abs_ps(l));
    _mm512_mask_storeu_ps(lo_u + k, mask, l);
    const __m512i codes = _mm512_add_epi32(_mm512_cvtps_epi32(h), flip);
    _mm_mask_storeu_epi8(hi + k, mask, _mm512_cvtepi32_epi8(codes));
  }
  *lo_step = std::max(_mm512_reduce_max_ps(lmax), kTiny) / kQmax;
  const __m512 vlo = _mm512_set1_ps(*lo_step);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mask = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
    const __m512 c = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(mask, lo_u + k), vlo),
                                          kRound);
    const __m512i codes = _mm512_add_epi32(_mm512_cvtps_epi32(c), flip);
    _mm_mask_storeu_epi8(lo + k, mask, _mm512_cvtepi32_epi8(codes));
  }
}

__attribute__((target("avx2"))) void quantize_avx2(
    const float* x, int64_t K, int8_t* hi, int8_t* lo, float* lo_u, float* step, float* lo_step) {
  // no masked loads: whole vectors, then the tail one by one with the same arithmetic
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const int64_t K8 = K / 8 * 8;
  __m256 vmax = _mm256_setzero_ps();
  for (int64_t k = 0; k < K8; k += 8)
    vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float amax = 0.0f;
  for (float v : lanes) amax = std::max(amax, v);
  for (int64_t k = K8; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  *step = std::max(amax, kTiny) / kQmax;
  alignas(32) int32_t ints[8];
  const __m256 vstep = _mm256_set1_ps(*step);
  float lmax = 0.0f;
  for (int64_t k = 0; k < K8; k += 8) {
    const __m256 u = _mm256_div_ps(_mm256_loadu_ps(x + k), vstep);
    const __m256 h = _mm256_round_ps(u, kRound);
    const __m256 l = _mm256_sub_ps(u, h);
    _mm256_storeu_ps(lo_u + k, l);
    _mm256_store_si256(reinterpret_cast<__m256i*>(ints), _mm256_cvtps_epi32(h));
    for (int j = 0; j < 8; ++j) hi[k + j] = int8_t(ints[j]);
  }
  for (int64_t k = K8; k < K; ++k) {
    const float u = x[k] / *step;
    const float h = std::nearbyint(u);
    lo_u[k] = u - h;
    hi[k] = int8_t(h);
  }
  for (int64_t k = 0; k < K; ++k) lmax = std::max(lmax, std::fabs(lo_u[k]));
  *lo_step = std::max(lmax, kTiny) / kQmax;
  const __m256 vlo = _mm256_set1_ps(*lo_step);
  for (int64_t k = 0; k < K8; k += 8) {
    const __m256 c = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(lo_u + k), vlo), kRound);
    _mm256_store_si256(reinterpret_cast<__m256i*>(ints), _mm256_cvtps_epi32(c));
    for (int j = 0; j < 8; ++j) lo[k + j] = int8_t(ints[j]);
  }
  for (int64_t k = K8; k < K; ++k) lo[k] = int8_t(std::nearbyint(lo_u[k] / *lo_step));
}

void check_isa(int64_t& isa) {
  if (isa == kAuto) isa = best_isa();
  TORCH_CHECK(supported(isa), "int8 kernels: this CPU lacks the instructions asked for");
}

RowFn row_fn(int64_t isa, int64_t rows) {
  return isa == kAvx512Vnni ? pick<Vnni>(rows) : pick<Avx2>(rows);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& b, const at::Tensor& scale,
                       int64_t isa) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && b.scalar_type() == at::kChar &&
                  scale.scalar_type() == at::kFloat,
              "int8_linear: float32 x, int8 b, float32 scale");
  TORCH_CHECK(x.dim() == 2 && b.dim() == 2 && x.size(1) == b.size(1) &&
                  scale.numel() == b.size(0),
              "int8_linear: x [M, K], b [N, K], scale [N]");
  TORCH_CHECK(2 * x.size(0) <= kMaxRows, "int8_linear: at most ", kMaxRows / 2, " rows of x");
  check_isa(isa);
  const at::Tensor xc = x.contiguous(), bc = b.contiguous(), sc = scale.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = b.size(0);
  // codes: the M rows' values, then their rounding errors, as one [2M, K] matrix
  std::vector<int8_t> codes(2 * M * K);
  std::vector<float> lo_u(K), step(M), lo_step(M);
  const float* xp = xc.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    int8_t* hi = codes.data() + m * K;
    int8_t* lo = codes.data() + (M + m) * K;
    if (isa == kAvx512Vnni)
      quantize_avx512(xp + m * K, K, hi, lo, lo_u.data(), &step[m], &lo_step[m]);
    else
      quantize_avx2(xp + m * K, K, hi, lo, lo_u.data(), &step[m], &lo_step[m]);
  }
  at::Tensor y = at::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  const int8_t* bp = bc.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  const int64_t rows = 2 * M;
  const RowFn first = row_fn(isa, std::min<int64_t>(8, rows));
  const RowFn second = rows > 8 ? row_fn(isa, rows - 8) : nullptr;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    int32_t acc[kMaxRows];
    for (int64_t n = n0; n < n1; ++n) {
      first(codes.data(), bp + n * K, acc, K, 1);
      if (second) second(codes.data() + 8 * K, bp + n * K, acc + 8, K, 1);
      for (int64_t m = 0; m < M; ++m)
        yp[m * N + n] = (float(acc[m]) + float(acc[M + m]) * lo_step[m]) * (step[m] * sp[n]);
    }
  });
  return y;
}

at::Tensor int8_mm(const at::Tensor& a, const at::Tensor& b, int64_t isa) {
  TORCH_CHECK(a.scalar_type() == at::kChar && b.scalar_type() == at::kChar,
              "int8_mm: int8 operands");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1),
              "int8_mm: a [M, K] and b [N, K]");
  TORCH_CHECK(a.size(0) <= kMaxRows, "int8_mm: at most ", kMaxRows, " rows of a");
  check_isa(isa);
  // VNNI reads a offset by 128, as unsigned bytes
  const at::Tensor ac = isa == kAvx512Vnni ? at::bitwise_xor(a, -128).contiguous() : a.contiguous();
  const at::Tensor bc = b.contiguous();
  const int64_t M = a.size(0), K = a.size(1), N = b.size(0);
  at::Tensor c = at::empty({M, N}, a.options().dtype(at::kInt));
  const int8_t* ap = ac.data_ptr<int8_t>();
  const int8_t* bp = bc.data_ptr<int8_t>();
  int32_t* cp = c.data_ptr<int32_t>();
  // about 64 KiB of b per task: enough work to be worth a thread, and many tasks to balance
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1));
  RowFn fns[kMaxRows / 8];  // per group of 8 rows of a
  for (int64_t m0 = 0; m0 < M; m0 += 8) {
    const int64_t rows = std::min<int64_t>(8, M - m0);
    fns[m0 / 8] = row_fn(isa, rows);
  }
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)  // a row of b stays in L1 for every group of a's rows
      for (int64_t m0 = 0; m0 < M; m0 += 8)
        fns[m0 / 8](ap + m0 * K, bp + n * K, cp + m0 * N + n, K, N);
  });
  return c;
}

}  // namespace

TORCH_LIBRARY(shardserve_kernels, m) {
  // isa: 0 the best this CPU has, 1 AVX2, 2 AVX-512 VNNI (tests run each)
  m.def("int8_mm(Tensor a, Tensor b, int isa=0) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor b, Tensor scale, int isa=0) -> Tensor");
  m.def("int8_mm_isa() -> int", []() -> int64_t { return best_isa(); });
}

TORCH_LIBRARY_IMPL(shardserve_kernels, CPU, m) {
  m.impl("int8_mm", &int8_mm);
  m.impl("int8_linear", &int8_linear);
}
