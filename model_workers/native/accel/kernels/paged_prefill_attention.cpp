// Prefill attention straight from the paged KV cache: a chunk of query tokens of one sequence against that
// sequence's keys, as a torch custom op. The cache is fp32 or bf16. The softmax and every sum are fp32. On a bf16
// cache, where the build has AVX512-BF16 (prefill_bf16_dot()), the products take the bf16 dot-product instruction
// with the query and the softmax weights rounded to bf16 (as SDPA's bf16 path rounds them); elsewhere the bf16
// values are widened exactly and multiplied in fp32.
//
// Why: SDPA's CPU flash kernel runs Gemma's 256-wide heads far below the projections' GEMM rate, and the torch path
// first gathers the chunk's pages into a contiguous copy per layer. Here a block of query tokens (all the query heads
// of one KV head: GQA) meets each block of keys once, flash-style (online softmax), reading the keys in place:
//   scores  S[m][j] = scale * q_m . k_j   with the key block widened and transposed into a small buffer, so the
//                                          inner loop is a GEMM's (broadcast q, a vector of 16 keys);
//   values  acc[m][:] += p[m][j] * v_j     (broadcast p, a vector of 16 dims).
// Each query token t attends to the key positions [key_lo[t], key_hi[t]): causal, a sliding window, and an image
// block's bidirectional span are all such ranges (step_batch.py builds them); key blocks no row of a query block
// reaches are skipped, so a causal chunk costs half of the full square.
//
//   q         [T, Hq, D]      fp32, contiguous
//   k_cache   [N, P, Hkv, D]  fp32 or bf16; v_cache likewise; last three dims contiguous, any page stride
//   pages     [W] int64       the sequence's page ids; pages[0] holds position first_pos
//   key_lo    [T] int64       first key position each query token attends
//   key_hi    [T] int64       one past the last
//   returns   [T, Hq, D] fp32
// paged_prefill_attention_into writes the same values into `out` instead: [T, Hq, D] fp32, or bf16 rounded once to
// nearest even (what torch's cast of the fp32 output gives), each row's Hq x D values contiguous, any row stride: a
// row range of the step's attention output, in the dtype of the projection that reads it (the bf16 mode's bf16), so
// neither a copy nor a cast follows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "simd_widen.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

// Query tokens per block (x G heads = the block's rows). Each block streams its keys once, so larger blocks read
// a long context's keys fewer times; a chunk of fewer than 4 large blocks takes small ones, so both threads get work.
constexpr int64_t QB_LARGE = 64, QB_SMALL = 16;
constexpr int64_t KB = 32;  // keys per block: the widened, transposed block is D x 32 fp32 (32 KiB at D = 256)

inline float widen(float x) { return x; }
inline float widen(at::BFloat16 x) { return static_cast<float>(x); }

#if defined(__AVX512F__)
using g3serve_simd::load16;

// r[c] <- column c of the 16 x 16 block whose rows are r[0..16) (unpack pairs, then 4-lane groups, then 128-bit lanes).
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 2; ++i)
    for (int c = 0; c < 4; ++c) {
      t[8 * i + c] = _mm512_shuffle_f32x4(r[8 * i + c], r[8 * i + 4 + c], 0x88);
      t[8 * i + 4 + c] = _mm512_shuffle_f32x4(r[8 * i + c], r[8 * i + 4 + c], 0xDD);
    }
  for (int c = 0; c < 8; ++c) {
    r[c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0xDD);
  }
}
#endif

// kt[d * KB + j] = k_j[d] (fp32) for the n <= KB keys of a block; the rest of the buffer's columns are zero. With
// AVX-512, 16 x 16 blocks transposed in registers (the scalar form's strided stores cost a sizable share of the fp32
// path's time).
template <typename T>
void load_keys_transposed(const T* const* rows, int64_t n, int64_t D, float* kt) {
#if defined(__AVX512F__)
  static_assert(KB % 16 == 0, "whole 16-key groups");
  if (D % 16 == 0) {
    for (int64_t j0 = 0; j0 < KB; j0 += 16)
      for (int64_t d0 = 0; d0 < D; d0 += 16) {
        __m512 r[16];
        for (int64_t j = 0; j < 16; ++j) r[j] = j0 + j < n ? load16(rows[j0 + j] + d0) : _mm512_setzero_ps();
        transpose16(r);
        for (int64_t c = 0; c < 16; ++c) _mm512_storeu_ps(kt + (d0 + c) * KB + j0, r[c]);
      }
    return;
  }
#endif
  for (int64_t j = 0; j < n; ++j) {
    const T* k = rows[j];
    for (int64_t d = 0; d < D; ++d) kt[d * KB + j] = widen(k[d]);
  }
  for (int64_t j = n; j < KB; ++j)
    for (int64_t d = 0; d < D; ++d) kt[d * KB + j] = 0.f;
}


// s[m * KB + j] = sc * sum_d q[m * D + d] * kt[d * KB + j] for M rows and all KB (= 32) columns.
void block_scores(const float* q, int64_t M, int64_t D, const float* kt, float sc, float* s) {
#if defined(__AVX512F__)
  int64_t m = 0;
  for (; m + 6 <= M; m += 6) {  // 6 rows x 32 keys: 12 accumulators, 2 key loads per 12 FMAs
    __m512 acc[6][2];
    for (int r = 0; r < 6; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
      const __m512 k0 = _mm512_loadu_ps(kt + d * KB), k1 = _mm512_loadu_ps(kt + d * KB + 16);
      for (int r = 0; r < 6; ++r) {
        const __m512 qv = _mm512_set1_ps(q[(m + r) * D + d]);
        acc[r][0] = _mm512_fmadd_ps(qv, k0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(qv, k1, acc[r][1]);
      }
    }
    const __m512 scv = _mm512_set1_ps(sc);
    for (int r = 0; r < 6; ++r) {
      _mm512_storeu_ps(s + (m + r) * KB, _mm512_mul_ps(acc[r][0], scv));
      _mm512_storeu_ps(s + (m + r) * KB + 16, _mm512_mul_ps(acc[r][1], scv));
    }
  }
  for (; m < M; ++m) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
      const __m512 qv = _mm512_set1_ps(q[m * D + d]);
      a0 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(kt + d * KB), a0);
      a1 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(kt + d * KB + 16), a1);
    }
    _mm512_storeu_ps(s + m * KB, _mm512_mul_ps(a0, _mm512_set1_ps(sc)));
    _mm512_storeu_ps(s + m * KB + 16, _mm512_mul_ps(a1, _mm512_set1_ps(sc)));
  }
#else
  for (int64_t m = 0; m < M; ++m) {
    float row[KB] = {0.f};
    for (int64_t d = 0; d < D; ++d) {
      const float qd = q[m * D + d];
      const float* k = kt + d * KB;
#pragma omp simd
      for (int64_t j = 0; j < KB; ++j) row[j] += qd * k[j];
    }
    for (int64_t j = 0; j < KB; ++j) s[m * KB + j] = row[j] * sc;
  }
#endif
}

#if defined(__AVX512BF16__)
// The bf16 cache on CPUs with AVX512-BF16: the scores take the bf16 dot-product instruction (two products per fp32
// lane, summed in fp32), twice the fp32 FMA rate. The query is rounded to bf16 for it, as SDPA's bf16 path and the
// peers' bf16 attention do; the keys are the cache's own bf16 values, the sums, the softmax and the values stay fp32.
constexpr bool kBf16Dot = true;

// kt2[(d / 2) * KB + j] = the bf16 pair (k_j[d], k_j[d + 1]) for the n <= KB keys of a block (zero beyond n): 16 x 16
// blocks of pairs transposed in registers (the pairs' bits moved as they are), where D is a multiple of 32.
void load_key_pairs(const at::BFloat16* const* rows, int64_t n, int64_t D, uint32_t* kt2) {
  const int64_t DP = D / 2;
  if (DP % 16 == 0) {
    for (int64_t j0 = 0; j0 < KB; j0 += 16)
      for (int64_t dp0 = 0; dp0 < DP; dp0 += 16) {
        __m512 r[16];
        for (int64_t j = 0; j < 16; ++j)
          r[j] = j0 + j < n ? _mm512_castsi512_ps(_mm512_loadu_si512(rows[j0 + j] + 2 * dp0)) : _mm512_setzero_ps();
        transpose16(r);
        for (int64_t c = 0; c < 16; ++c) _mm512_storeu_ps(reinterpret_cast<float*>(kt2 + (dp0 + c) * KB + j0), r[c]);
      }
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t* k = reinterpret_cast<const uint32_t*>(rows[j]);
    for (int64_t dp = 0; dp < DP; ++dp) kt2[dp * KB + j] = k[dp];
  }
  for (int64_t j = n; j < KB; ++j)
    for (int64_t dp = 0; dp < DP; ++dp) kt2[dp * KB + j] = 0u;
}

// q2[m * D / 2 + dp] = the bf16 pair (q_m[2 dp], q_m[2 dp + 1]), rounded to nearest even: a row of bf16 values in
// order is a row of pairs as the dot-product instruction reads them (simd_widen.h's from_float rounds them).
void query_pairs(const float* q, int64_t M, int64_t D, uint32_t* q2) {
  for (int64_t m = 0; m < M; ++m)
    g3serve_simd::from_float(q + m * D, reinterpret_cast<at::BFloat16*>(q2 + m * D / 2), D);
}

// s[m * KB + j] = sc * q_m . k_j over bf16 pairs, for M rows and all KB (= 32) columns.
void block_scores_bf16(const uint32_t* q2, int64_t M, int64_t D, const uint32_t* kt2, float sc, float* s) {
  const int64_t DP = D / 2;
  const __m512 scv = _mm512_set1_ps(sc);
  int64_t m = 0;
  for (; m + 6 <= M; m += 6) {
    __m512 acc[6][2];
    for (int r = 0; r < 6; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t dp = 0; dp < DP; ++dp) {
      const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kt2 + dp * KB);
      const __m512bh k1 = (__m512bh)_mm512_loadu_si512(kt2 + dp * KB + 16);
      for (int r = 0; r < 6; ++r) {
        const __m512bh qv = (__m512bh)_mm512_set1_epi32(static_cast<int>(q2[(m + r) * DP + dp]));
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], qv, k0);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], qv, k1);
      }
    }
    for (int r = 0; r < 6; ++r) {
      _mm512_storeu_ps(s + (m + r) * KB, _mm512_mul_ps(acc[r][0], scv));
      _mm512_storeu_ps(s + (m + r) * KB + 16, _mm512_mul_ps(acc[r][1], scv));
    }
  }
  for (; m < M; ++m) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (int64_t dp = 0; dp < DP; ++dp) {
      const __m512bh qv = (__m512bh)_mm512_set1_epi32(static_cast<int>(q2[m * DP + dp]));
      a0 = _mm512_dpbf16_ps(a0, qv, (__m512bh)_mm512_loadu_si512(kt2 + dp * KB));
      a1 = _mm512_dpbf16_ps(a1, qv, (__m512bh)_mm512_loadu_si512(kt2 + dp * KB + 16));
    }
    _mm512_storeu_ps(s + m * KB, _mm512_mul_ps(a0, scv));
    _mm512_storeu_ps(s + m * KB + 16, _mm512_mul_ps(a1, scv));
  }
}

// vt2[jj * D + d] = the bf16 pair (v_{2jj}[d], v_{2jj+1}[d]) for the n keys of a block (a zero value past n).
void value_pairs(const at::BFloat16* const* rows, int64_t n, int64_t D, uint32_t* vt2) {
  for (int64_t jj = 0; jj < (n + 1) / 2; ++jj) {
    const uint16_t* v0 = reinterpret_cast<const uint16_t*>(rows[2 * jj]);
    const uint16_t* v1 = 2 * jj + 1 < n ? reinterpret_cast<const uint16_t*>(rows[2 * jj + 1]) : nullptr;
    uint32_t* o = vt2 + jj * D;
    if (v1 != nullptr) {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<uint32_t>(v0[d]) | (static_cast<uint32_t>(v1[d]) << 16);
    } else {
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<uint32_t>(v0[d]);
    }
  }
}

// p2[m * KB / 2 + jj] = the bf16 pair (p[m][2jj], p[m][2jj + 1]): the softmax weights rounded for the value products
// (as SDPA's bf16 path does); their sums stay fp32.
void prob_pairs(const float* p, int64_t M, uint32_t* p2) {
  for (int64_t m = 0; m < M; ++m)
    g3serve_simd::from_float(p + m * KB, reinterpret_cast<at::BFloat16*>(p2 + m * KB / 2), KB);
}

// acc[m * D + d] += sum_jj (p2 pair) . (vt2 pair) for M rows, D a multiple of 64: 4 rows x 64 dims in registers.
void block_values_bf16(const uint32_t* p2, int64_t M, int64_t pairs, int64_t D, const uint32_t* vt2, float* acc) {
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) {
      __m512 a[4][4];
      for (int r = 0; r < 4; ++r)
        for (int c = 0; c < 4; ++c) a[r][c] = _mm512_loadu_ps(acc + (m + r) * D + d0 + 16 * c);
      for (int64_t jj = 0; jj < pairs; ++jj) {
        const uint32_t* v = vt2 + jj * D + d0;
        const __m512bh v0 = (__m512bh)_mm512_loadu_si512(v), v1 = (__m512bh)_mm512_loadu_si512(v + 16);
        const __m512bh v2 = (__m512bh)_mm512_loadu_si512(v + 32), v3 = (__m512bh)_mm512_loadu_si512(v + 48);
        for (int r = 0; r < 4; ++r) {
          const __m512bh pr = (__m512bh)_mm512_set1_epi32(static_cast<int>(p2[(m + r) * KB / 2 + jj]));
          a[r][0] = _mm512_dpbf16_ps(a[r][0], pr, v0);
          a[r][1] = _mm512_dpbf16_ps(a[r][1], pr, v1);
          a[r][2] = _mm512_dpbf16_ps(a[r][2], pr, v2);
          a[r][3] = _mm512_dpbf16_ps(a[r][3], pr, v3);
        }
      }
      for (int r = 0; r < 4; ++r)
        for (int c = 0; c < 4; ++c) _mm512_storeu_ps(acc + (m + r) * D + d0 + 16 * c, a[r][c]);
    }
    for (; m < M; ++m) {
      __m512 a[4];
      for (int c = 0; c < 4; ++c) a[c] = _mm512_loadu_ps(acc + m * D + d0 + 16 * c);
      for (int64_t jj = 0; jj < pairs; ++jj) {
        const __m512bh pr = (__m512bh)_mm512_set1_epi32(static_cast<int>(p2[m * KB / 2 + jj]));
        for (int c = 0; c < 4; ++c)
          a[c] = _mm512_dpbf16_ps(a[c], pr, (__m512bh)_mm512_loadu_si512(vt2 + jj * D + d0 + 16 * c));
      }
      for (int c = 0; c < 4; ++c) _mm512_storeu_ps(acc + m * D + d0 + 16 * c, a[c]);
    }
  }
}
#else
constexpr bool kBf16Dot = false;
#endif

// acc[m * D + d] += sum_{j < n} p[m * KB + j] * v_j[d] for M rows, the value rows read in place (widened as read).
template <typename T>
void block_values(const float* p, int64_t M, int64_t n, int64_t D, const T* const* rows, float* acc) {
#if defined(__AVX512F__)
  if (D % 64 == 0) {
    for (int64_t d0 = 0; d0 < D; d0 += 64) {
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) {  // 4 rows x 64 dims: 16 accumulators, 4 value loads per 16 FMAs
        __m512 a[4][4];
        for (int r = 0; r < 4; ++r)
          for (int c = 0; c < 4; ++c) a[r][c] = _mm512_loadu_ps(acc + (m + r) * D + d0 + 16 * c);
        for (int64_t j = 0; j < n; ++j) {
          const T* v = rows[j] + d0;
          const __m512 v0 = load16(v), v1 = load16(v + 16);
          const __m512 v2 = load16(v + 32), v3 = load16(v + 48);
          for (int r = 0; r < 4; ++r) {
            const __m512 pr = _mm512_set1_ps(p[(m + r) * KB + j]);
            a[r][0] = _mm512_fmadd_ps(pr, v0, a[r][0]);
            a[r][1] = _mm512_fmadd_ps(pr, v1, a[r][1]);
            a[r][2] = _mm512_fmadd_ps(pr, v2, a[r][2]);
            a[r][3] = _mm512_fmadd_ps(pr, v3, a[r][3]);
          }
        }
        for (int r = 0; r < 4; ++r)
          for (int c = 0; c < 4; ++c) _mm512_storeu_ps(acc + (m + r) * D + d0 + 16 * c, a[r][c]);
      }
      for (; m < M; ++m) {
        for (int64_t j = 0; j < n; ++j) {
          const float pr = p[m * KB + j];
          const T* v = rows[j] + d0;
          float* a = acc + m * D + d0;
#pragma omp simd
          for (int64_t d = 0; d < 64; ++d) a[d] += pr * widen(v[d]);
        }
      }
    }
    return;
  }
#endif
  for (int64_t m = 0; m < M; ++m) {
    float* a = acc + m * D;
    for (int64_t j = 0; j < n; ++j) {
      const float pr = p[m * KB + j];
      const T* v = rows[j];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) a[d] += pr * widen(v[d]);
    }
  }
}

#if defined(__AVX512F__)
// e^x for x <= 0 (scores minus their row's max), 16 lanes: x = n ln2 + r with |r| <= ln2 / 2, a degree-6 polynomial
// for e^r (Horner), 2^n by scalef. Relative error about 2 ulp; below -87 (e^x < 1.6e-38) it returns 0-ish values.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
#endif

#if defined(__AVX512F__)
// The lanes [a, z) of a 16-lane vector (a and z may lie outside [0, 16)).
inline __mmask16 lane_mask(int64_t a, int64_t z) {
  a = std::clamp<int64_t>(a, 0, 16);
  z = std::clamp<int64_t>(z, 0, 16);
  if (a >= z) return 0;
  const uint32_t below_z = z >= 16 ? 0xFFFFu : ((1u << z) - 1), below_a = (1u << a) - 1;
  return static_cast<__mmask16>(below_z & ~below_a);
}
#endif

// One row's share of a key block in the online softmax. sr: the row's KB scores, of which [a, z) are its keys.
// Turns sr into exp(score - max) on [a, z) and 0 elsewhere; when the row's max grows, rescales what it has summed
// (row_sum, its value accumulator am[0, D)) by exp(old max - new max).
inline void softmax_row(float* sr, int64_t a, int64_t z, float& row_max, float& row_sum, float* am, int64_t D) {
#if defined(__AVX512F__)
  static_assert(KB == 32, "two 16-lane vectors per row");
  const __mmask16 m0 = lane_mask(a, z), m1 = lane_mask(a - 16, z - 16);
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 s0 = _mm512_mask_loadu_ps(ninf, m0, sr), s1 = _mm512_mask_loadu_ps(ninf, m1, sr + 16);
  const float mx = std::max(row_max, _mm512_reduce_max_ps(_mm512_max_ps(s0, s1)));
  if (mx > row_max) {
    const float corr = std::exp(row_max - mx);  // exp(-inf) = 0 for a row's first block
    row_sum *= corr;
    if (corr != 1.f)
      for (int64_t d = 0; d < D; ++d) am[d] *= corr;
    row_max = mx;
  }
  const __m512 mv = _mm512_set1_ps(mx);
  const __m512 e0 = _mm512_maskz_mov_ps(m0, exp_nonpositive(_mm512_sub_ps(s0, mv)));
  const __m512 e1 = _mm512_maskz_mov_ps(m1, exp_nonpositive(_mm512_sub_ps(s1, mv)));
  _mm512_storeu_ps(sr, e0);
  _mm512_storeu_ps(sr + 16, e1);
  row_sum += _mm512_reduce_add_ps(_mm512_add_ps(e0, e1));
#else
  float mx = row_max;
  for (int64_t j = a; j < z; ++j) mx = std::max(mx, sr[j]);
  if (mx > row_max) {
    const float corr = std::exp(row_max - mx);
    row_sum *= corr;
    if (corr != 1.f)
      for (int64_t d = 0; d < D; ++d) am[d] *= corr;
    row_max = mx;
  }
  float total = 0.f;
  for (int64_t j = 0; j < a; ++j) sr[j] = 0.f;
  for (int64_t j = a; j < z; ++j) total += (sr[j] = std::exp(sr[j] - mx));
  for (int64_t j = z; j < KB; ++j) sr[j] = 0.f;
  row_sum += total;
#endif
}

// One output row: acc * inv, stored as O (bf16: the fp32 product rounded once, as torch's cast rounds it).
template <typename O>
inline void store_row(const float* am, float inv, O* o, int64_t D) {
  int64_t d = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<O, at::BFloat16>) {
    const __m512 iv = _mm512_set1_ps(inv);
    for (; d + 16 <= D; d += 16) g3serve_simd::store16(o + d, _mm512_mul_ps(load16(am + d), iv));
  }
#endif
  for (; d < D; ++d) o[d] = static_cast<O>(am[d] * inv);
}

template <typename T, typename O>
void attend_chunk(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& pages,
                  int64_t first_pos, const at::Tensor& key_lo, const at::Tensor& key_hi, float sc, at::Tensor& out) {
  const int64_t NT = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t P = k_cache.size(1), Hkv = k_cache.size(2), W = pages.size(0);
  const int64_t G = Hq / Hkv, page_stride = k_cache.stride(0), pos_stride = k_cache.stride(1);
  const float* qp = q.data_ptr<float>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  O* op = out.data_ptr<O>();
  const int64_t out_stride = out.stride(0);
  const int64_t* pg = pages.data_ptr<int64_t>();
  const int64_t* lo_p = key_lo.data_ptr<int64_t>();
  const int64_t* hi_p = key_hi.data_ptr<int64_t>();
  for (int64_t t = 0; t < NT; ++t)
    TORCH_CHECK(lo_p[t] >= first_pos && lo_p[t] < hi_p[t] && (hi_p[t] - 1 - first_pos) / P < W,
                "key range outside the block table");

  constexpr bool bf16_dot = kBf16Dot && std::is_same_v<T, at::BFloat16>;
  if constexpr (bf16_dot) TORCH_CHECK(D % 2 == 0, "head dim must be even");
  const int64_t QB = NT >= 4 * QB_LARGE ? QB_LARGE : QB_SMALL;
  const int64_t blocks = (NT + QB - 1) / QB;
  const int64_t items = blocks * Hkv;
  // Under a causal mask later query blocks have more keys. at::parallel_for hands each thread a contiguous range
  // of items, so the items are dealt in the order first, last, second, second-to-last...: every range mixes cheap
  // and costly blocks.
  auto block_of = [&](int64_t i) { return (i % 2 == 0) ? i / 2 : blocks - 1 - i / 2; };
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    const int64_t M_max = QB * G;
    std::vector<float> qb(M_max * D), acc(M_max * D), kt(D * KB), s(M_max * KB);
    std::vector<float> row_max(M_max), row_sum(M_max);
    std::vector<const T*> k_rows(KB), v_rows(KB);
    std::vector<uint32_t> q2(bf16_dot ? M_max * D / 2 : 0), kt2(bf16_dot ? D / 2 * KB : 0);
    std::vector<uint32_t> vt2(bf16_dot ? KB / 2 * D : 0), p2(bf16_dot ? M_max * KB / 2 : 0);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / blocks, b = block_of(item % blocks);
      const int64_t t0 = b * QB, nt = std::min(QB, NT - t0), M = nt * G;
      // Rows m = tt * G + g: token t0 + tt, query head h * G + g.
      for (int64_t tt = 0; tt < nt; ++tt)
        std::copy(qp + ((t0 + tt) * Hq + h * G) * D, qp + ((t0 + tt) * Hq + h * G + G) * D, qb.data() + tt * G * D);
#if defined(__AVX512BF16__)
      if constexpr (bf16_dot) query_pairs(qb.data(), M, D, q2.data());
#endif
      std::fill(acc.begin(), acc.begin() + M * D, 0.f);
      std::fill(row_max.begin(), row_max.begin() + M, -std::numeric_limits<float>::infinity());
      std::fill(row_sum.begin(), row_sum.begin() + M, 0.f);
      int64_t lo = lo_p[t0], hi = hi_p[t0];
      for (int64_t tt = 1; tt < nt; ++tt) {
        lo = std::min(lo, lo_p[t0 + tt]);
        hi = std::max(hi, hi_p[t0 + tt]);
      }
      for (int64_t k0 = lo; k0 < hi; k0 += KB) {
        const int64_t n = std::min(KB, hi - k0);
        for (int64_t j = 0; j < n; ++j) {
          const int64_t rel = k0 + j - first_pos;
          const int64_t off = pg[rel / P] * page_stride + (rel % P) * pos_stride + h * D;
          k_rows[j] = kp + off;
          v_rows[j] = vp + off;
        }
#if defined(__AVX512BF16__)
        if constexpr (bf16_dot) {
          load_key_pairs(k_rows.data(), n, D, kt2.data());
          block_scores_bf16(q2.data(), M, D, kt2.data(), sc, s.data());
        } else
#endif
        {
          load_keys_transposed<T>(k_rows.data(), n, D, kt.data());
          block_scores(qb.data(), M, D, kt.data(), sc, s.data());
        }
        // Online softmax: mask each row to its key range, rescale what it has summed when its max grows.
        bool any = false;
        for (int64_t m = 0; m < M; ++m) {
          const int64_t t = t0 + m / G;
          const int64_t a = std::max<int64_t>(0, lo_p[t] - k0), z = std::min<int64_t>(n, hi_p[t] - k0);
          float* sr = s.data() + m * KB;
          if (a >= z) {  // no key of this block for this row
            std::fill(sr, sr + KB, 0.f);
            continue;
          }
          any = true;
          softmax_row(sr, a, z, row_max[m], row_sum[m], acc.data() + m * D, D);
        }
        if (!any) continue;
#if defined(__AVX512BF16__)
        if constexpr (bf16_dot) {
          if (D % 64 == 0) {
            value_pairs(v_rows.data(), n, D, vt2.data());
            prob_pairs(s.data(), M, p2.data());
            block_values_bf16(p2.data(), M, (n + 1) / 2, D, vt2.data(), acc.data());
            continue;
          }
        }
#endif
        block_values<T>(s.data(), M, n, D, v_rows.data(), acc.data());
      }
      for (int64_t tt = 0; tt < nt; ++tt)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t m = tt * G + g;
          store_row(acc.data() + m * D, 1.f / row_sum[m], op + (t0 + tt) * out_stride + (h * G + g) * D, D);
        }
    }
  });
}

void paged_prefill_attention_into(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& pages, int64_t first_pos, const at::Tensor& key_lo,
                                  const at::Tensor& key_hi, double scale, at::Tensor out) {
  const auto kv_type = k_cache.scalar_type();
  TORCH_CHECK(q.scalar_type() == at::kFloat, "q must be fp32");
  TORCH_CHECK(kv_type == at::kFloat || kv_type == at::kBFloat16, "the KV cache must be fp32 or bf16");
  TORCH_CHECK(v_cache.scalar_type() == kv_type, "k_cache and v_cache must share a dtype");
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q must be a contiguous [T, Hq, D]");
  TORCH_CHECK(pages.dim() == 1 && pages.is_contiguous() && pages.scalar_type() == at::kLong, "pages: [W] int64");
  TORCH_CHECK(key_lo.is_contiguous() && key_hi.is_contiguous() && key_lo.size(0) == q.size(0) &&
                  key_hi.size(0) == q.size(0),
              "key_lo/key_hi: one int64 per query token");
  TORCH_CHECK(k_cache.stride(3) == 1 && k_cache.stride(2) == k_cache.size(3) &&
                  k_cache.stride(1) == k_cache.size(2) * k_cache.size(3),
              "k_cache: last three dims must be contiguous");
  TORCH_CHECK(v_cache.strides() == k_cache.strides(), "k_cache and v_cache must share strides");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0 && k_cache.size(3) == q.size(2), "shape mismatch");
  TORCH_CHECK(out.sizes() == q.sizes() && out.device().is_cpu() &&
                  (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16),
              "out must be a CPU fp32 or bf16 tensor of q's shape");
  TORCH_CHECK(out.stride(2) == 1 && out.stride(1) == out.size(2) && out.stride(0) >= out.size(1) * out.size(2),
              "each row of out must be contiguous");
  if (q.size(0) == 0) return;
  const float sc = static_cast<float>(scale);
  const bool bf16_out = out.scalar_type() == at::kBFloat16;
  if (kv_type == at::kBFloat16) {
    if (bf16_out)
      attend_chunk<at::BFloat16, at::BFloat16>(q, k_cache, v_cache, pages, first_pos, key_lo, key_hi, sc, out);
    else
      attend_chunk<at::BFloat16, float>(q, k_cache, v_cache, pages, first_pos, key_lo, key_hi, sc, out);
  } else {
    if (bf16_out)
      attend_chunk<float, at::BFloat16>(q, k_cache, v_cache, pages, first_pos, key_lo, key_hi, sc, out);
    else
      attend_chunk<float, float>(q, k_cache, v_cache, pages, first_pos, key_lo, key_hi, sc, out);
  }
}

at::Tensor paged_prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const at::Tensor& pages, int64_t first_pos, const at::Tensor& key_lo,
                                   const at::Tensor& key_hi, double scale) {
  auto out = at::empty_like(q);
  paged_prefill_attention_into(q, k_cache, v_cache, pages, first_pos, key_lo, key_hi, scale, out);
  return out;
}

}  // namespace

bool bf16_dot_built() { return kBf16Dot; }

TORCH_LIBRARY_FRAGMENT(g3serve, m) {
  m.def("prefill_bf16_dot() -> bool", &bf16_dot_built);  // no tensor arguments: a catch-all kernel
  m.def(
      "paged_prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor pages, int first_pos, "
      "Tensor key_lo, Tensor key_hi, float scale) -> Tensor");
  m.def(
      "paged_prefill_attention_into(Tensor q, Tensor k_cache, Tensor v_cache, Tensor pages, int first_pos, "
      "Tensor key_lo, Tensor key_hi, float scale, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(g3serve, CPU, m) {
  m.impl("paged_prefill_attention", &paged_prefill_attention);
  m.impl("paged_prefill_attention_into", &paged_prefill_attention_into);
}
