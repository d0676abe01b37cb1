// Decode attention over the paged KV cache, one query token per sequence, for CPU decode steps:
//   shardserve_kernels::paged_decode(q, k_cache, v_cache, block_ids, positions, scale)
//     q [s, heads, d]; caches [blocks, block_size, kv_heads, d]; block_ids [s, width] int64;
//     positions [s] int64, the query's own position (its K/V already written). Each query
//     head attends over positions 0..positions[i] of its KV head (heads / kv_heads query heads
//     share one), reading every K/V row where it lies in the cache. Returns [s, heads, d].
// Inductor's lowering of the same reductions (paged_decode.py) took ~100 us a layer for one
// sequence at a few hundred positions, a third of the embedded model's step; this is a few us.
// float32 or bfloat16 (q and caches alike; sums in float32); d a multiple of 16, at most 256.
// AVX-512 (F, BW); built with gemv.cpp by shards/kernels.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../bf16.h"

namespace {

constexpr int64_t kMaxHeadDim = 256;

template <typename T>
__attribute__((target("avx512f,avx512bw"), always_inline)) inline __m512 load16(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_loadu_ps(p);
  } else {
    return shardserve::load_bf16(reinterpret_cast<const uint16_t*>(p));
  }
}

template <typename T>
__attribute__((target("avx512f,avx512bw"), always_inline)) inline void store16(T* p, __m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_storeu_ps(p, v);
  } else {
    shardserve::store_bf16(reinterpret_cast<uint16_t*>(p), v);
  }
}

// One query head of one sequence: softmax(q . K / sqrt) . V over its n positions.
template <typename T>
__attribute__((target("avx512f,avx512bw"))) void attend(const T* q, const T* k, const T* v,
                                                        const int64_t* blocks, int64_t n,
                                                        int64_t block_size, int64_t row_stride,
                                                        int64_t d, float scale, float* scores,
                                                        T* out) {
  const int64_t chunks = d / 16;
  __m512 qv[kMaxHeadDim / 16];
  for (int64_t c = 0; c < chunks; ++c) qv[c] = _mm512_mul_ps(load16(q + 16 * c), _mm512_set1_ps(scale));
  float top = -INFINITY;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t row = blocks[t / block_size] * block_size + t % block_size;
    const T* kr = k + row * row_stride;
    __m512 acc = _mm512_mul_ps(qv[0], load16(kr));
    for (int64_t c = 1; c < chunks; ++c) acc = _mm512_fmadd_ps(qv[c], load16(kr + 16 * c), acc);
    scores[t] = _mm512_reduce_add_ps(acc);
    top = std::max(top, scores[t]);
  }
  float total = 0.0f;
  for (int64_t t = 0; t < n; ++t) total += (scores[t] = std::exp(scores[t] - top));
  __m512 o[kMaxHeadDim / 16];
  for (int64_t c = 0; c < chunks; ++c) o[c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    const int64_t row = blocks[t / block_size] * block_size + t % block_size;
    const T* vr = v + row * row_stride;
    const __m512 p = _mm512_set1_ps(scores[t]);
    for (int64_t c = 0; c < chunks; ++c) o[c] = _mm512_fmadd_ps(p, load16(vr + 16 * c), o[c]);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / total);
  for (int64_t c = 0; c < chunks; ++c) store16(out + 16 * c, _mm512_mul_ps(o[c], inv));
}

template <typename T>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& ids,
         const at::Tensor& pos, float scale, at::Tensor& out) {
  const int64_t s = q.size(0), heads = q.size(1), d = q.size(2);
  const int64_t block_size = k.size(1), kv_heads = k.size(2), width = ids.size(1);
  const int64_t group = heads / kv_heads, row_stride = kv_heads * d;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const int64_t* ip = ids.data_ptr<int64_t>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, s * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(width * block_size);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t i = job / heads, h = job % heads, kvh = h / group;
      const int64_t n = std::min(pp[i] + 1, width * block_size);
      attend<T>(qp + job * d, kp + kvh * d, vp + kvh * d, ip + i * width, n, block_size,
                row_stride, d, scale, scores.data(), op + job * d);
    }
  });
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_ids, const at::Tensor& positions, double scale) {
  TORCH_CHECK(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"),
              "paged_decode: needs AVX-512");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "paged_decode: q [s, heads, d], caches [blocks, block_size, kv_heads, d]");
  const int64_t d = q.size(2);
  TORCH_CHECK(k_cache.size(3) == d && d % 16 == 0 && d <= kMaxHeadDim &&
                  q.size(1) % k_cache.size(2) == 0,
              "paged_decode: head size a multiple of 16 up to 256, heads a multiple of kv_heads");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "paged_decode: q and caches all float32 or all bfloat16");
  TORCH_CHECK(block_ids.scalar_type() == at::kLong && positions.scalar_type() == at::kLong &&
                  block_ids.dim() == 2 && block_ids.size(0) == q.size(0) &&
                  positions.numel() == q.size(0),
              "paged_decode: int64 block_ids [s, width] and positions [s]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(),
              "paged_decode: contiguous caches");
  const at::Tensor qc = q.contiguous(), ic = block_ids.contiguous(), pc = positions.contiguous();
  at::Tensor out = at::empty_like(qc);
  if (q.scalar_type() == at::kFloat)
    run<float>(qc, k_cache, v_cache, ic, pc, float(scale), out);
  else
    run<at::BFloat16>(qc, k_cache, v_cache, ic, pc, float(scale), out);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(shardserve_kernels, m) {
  m.def(
      "paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_ids, "
      "Tensor positions, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(shardserve_kernels, CPU, m) { m.impl("paged_decode", &paged_decode); }
