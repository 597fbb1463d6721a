// The kernels' shared pieces (one header, included by each .cpp of the library): 16 lanes of fp32 or bf16 read as
// fp32 and written back from fp32, an inlined exp, and torch's own vectorized exp (AVX-512); and rows of bf16 widened
// to fp32 or fp32 rounded to bf16 (every build: vector loops where the build has them, c10's conversions for the rest).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
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

// exp of 16 lanes, inlined (SLEEF's is a call, which keeps a loop from overlapping its lanes' long dependency
// chains): x = n ln2 + r with |r| <= ln2 / 2 (Cody-Waite: ln2 in two parts), e^r by Cephes expf's degree-6
// polynomial, then 2^n by scalef, which takes overflow to inf and underflow to 0. About as accurate as SLEEF's
// 1-ulp exp (tests/unit/test_fused_layer_ops.py bounds it against float64). NaN stays NaN.
inline __m512 exp16(__m512 x) {
  const __m512 xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(89.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_scalef_ps(p, n), x);
}

}  // namespace g3serve_simd

// torch's own vectorized exp (SLEEF, exported by libtorch_cpu; 1-ulp accurate).
extern "C" __m512 Sleef_expf16_u10(__m512);
#endif

namespace g3serve_simd {

// bf16 -> fp32, exact.
inline void to_float(const at::BFloat16* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, load16(src + i));
#elif defined(__AVX2__)
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  for (; i + 8 <= n; i += 8) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// fp32 -> bf16, rounded to nearest even as torch's cast rounds (store16; c10::BFloat16 for the tail).
inline void from_float(const float* src, at::BFloat16* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) store16(dst + i, _mm512_loadu_ps(src + i));
#endif
  for (; i < n; ++i) dst[i] = at::BFloat16(src[i]);
}

}  // namespace g3serve_simd
