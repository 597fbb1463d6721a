// The kernels' shared AVX-512 pieces (one header, included by each .cpp of the library): 16 lanes of fp32 or bf16
// read as fp32, and torch's own vectorized exp.
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

}  // namespace g3serve_simd

// torch's own vectorized exp (SLEEF, exported by libtorch_cpu; 1-ulp accurate).
extern "C" __m512 Sleef_expf16_u10(__m512);
#endif
