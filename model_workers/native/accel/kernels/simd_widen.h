// The kernels' shared AVX-512 pieces (one header, included by each .cpp of the library): 16 lanes of fp32 or bf16
// read as fp32 and written back from fp32, and torch's own vectorized exp.
#pragma once

#if defined(__AVX512F__)
#include <ATen/ATen.h>
#include <immintrin.h>

namespace g3serve_simd {

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
// bf16 -> fp32 is exact: the 16 bits become the high half of the fp32 word.
inline __m512 load16(const at::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// 16 fp32 lanes stored as fp32, or rounded to bf16: to nearest even (bits + 0x7fff + the kept part's lowest bit,
// then the high half), the rule of torch's CPU cast (c10::BFloat16 and its vectorized conversion). NaN stays NaN.
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(at::BFloat16* p, __m512 v) {
  const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff), nan = _mm512_set1_epi32(0x7fc0);
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), one);
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, bias), lsb), 16);
  r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), nan, r);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}

}  // namespace g3serve_simd

// torch's own vectorized exp (SLEEF, exported by libtorch_cpu; 1-ulp accurate).
extern "C" __m512 Sleef_expf16_u10(__m512);
#endif
