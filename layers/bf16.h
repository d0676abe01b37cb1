// bfloat16 <-> float32 on AVX-512 registers, for the hand-written CPU kernels of layers/.
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace shardserve {

// 16 bfloat16 values widened to float32 (exact)
__attribute__((target("avx512f,avx512bw"), always_inline)) inline __m512 load_bf16(
    const uint16_t* in) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// float32 -> bfloat16, nearest with ties to even, as torch rounds (the values are finite)
__attribute__((target("avx512f,avx512bw"), always_inline)) inline __m256i to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i up = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(up, 16));
}

__attribute__((target("avx512f,avx512bw"), always_inline)) inline void store_bf16(uint16_t* out,
                                                                                  __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), to_bf16(v));
}

}  // namespace shardserve
