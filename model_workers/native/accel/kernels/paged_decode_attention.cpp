// Decode attention straight from the paged KV cache (one query token per sequence), as a torch custom op. The cache
// is fp32 or bf16 (the bf16 mode's cache: half the bytes to stream); q, the scores, the softmax and the sums are fp32.
//
// Why: the torch path gathers every decoding sequence's pages into a contiguous copy per layer and then runs SDPA,
// so each key/value byte is read, written and read again. Here each (sequence, kv head) reads its keys and values
// once, in place, for all the query heads that share them (GQA), and torch's own thread pool splits the work.
//
//   q         [B, Hq, D]           contiguous
//   k_cache   [N, P, Hkv, D]       fp32 or bf16; v_cache likewise; last three dims contiguous, any page stride
//   pages     [B, W] int64         page ids of each sequence's blocks; pages[b][0] holds position first_pos[b]
//   first_pos [B] int64            absolute position of slot 0 of pages[b][0] (a multiple of P)
//   key_lo    [B] int64            first key position attended (0, or the sliding window's start)
//   key_hi    [B] int64            one past the last key position (the query's own position + 1)
//   returns   [B, Hq, D]
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "simd_widen.h"

#include <algorithm>
#include <type_traits>
#include <cmath>
#include <vector>

namespace {

// A page's rows are contiguous but pages are scattered, and hardware prefetchers stop at 4 KiB boundaries (4 rows
// of a 256-wide head): software-prefetch the row AHEAD positions on while this one is used. The distance is not
// critical (a few rows ahead cover a row's memory latency); benchmarks/decode_profile.py measures attention's share.
constexpr int64_t AHEAD = 4;
constexpr int64_t FAR = 8;  // the blocked paths prefetch further ahead: they consume rows several times faster
template <typename T>
inline void prefetch_row(const T* p, int64_t D) {
  constexpr int64_t line = 64 / sizeof(T);  // elements per 64-byte cache line
  for (int64_t d = 0; d < D; d += line) __builtin_prefetch(p + d, 0, 3);
}

inline float to_float(float x) { return x; }
inline float to_float(at::BFloat16 x) { return static_cast<float>(x); }

#if defined(__AVX512F__)
// AVX-512 paths, register-blocked (head dims that are multiples of 64). The portable loops below are bound by L1
// traffic (the value accumulator is loaded and stored for every key); these keep a block of accumulators in
// registers, which pays when the KV is in cache. From DRAM, with pages scattered, both paths run at about the speed
// of a plain torch gather of the same pages: the memory system bounds that case, not this code
// (benchmarks/decode_profile.py).
// Rows come as pointers (one per key position), so pages may lie anywhere.

using g3serve_simd::load16;

// out[g * stride + i] = scale * q_g . k_i for GB heads and every key row; four keys at a time share each q load.
template <int GB, typename T>
void scores_blocked(const float* q, int64_t D, const T* const* rows, int64_t n, float sc, float* out,
                    int64_t stride) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    for (int64_t j = FAR; j < FAR + 4 && i + j < n; ++j) prefetch_row(rows[i + j], D);
    __m512 acc[GB][4];
    for (int g = 0; g < GB; ++g)
      for (int j = 0; j < 4; ++j) acc[g][j] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 k0 = load16(rows[i] + d), k1 = load16(rows[i + 1] + d);
      const __m512 k2 = load16(rows[i + 2] + d), k3 = load16(rows[i + 3] + d);
      for (int g = 0; g < GB; ++g) {
        const __m512 qg = _mm512_loadu_ps(q + g * D + d);
        acc[g][0] = _mm512_fmadd_ps(qg, k0, acc[g][0]);
        acc[g][1] = _mm512_fmadd_ps(qg, k1, acc[g][1]);
        acc[g][2] = _mm512_fmadd_ps(qg, k2, acc[g][2]);
        acc[g][3] = _mm512_fmadd_ps(qg, k3, acc[g][3]);
      }
    }
    for (int g = 0; g < GB; ++g)
      for (int j = 0; j < 4; ++j) out[g * stride + i + j] = _mm512_reduce_add_ps(acc[g][j]) * sc;
  }
  for (; i < n; ++i) {
    __m512 acc[GB];
    for (int g = 0; g < GB; ++g) acc[g] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 k = load16(rows[i] + d);
      for (int g = 0; g < GB; ++g) acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * D + d), k, acc[g]);
    }
    for (int g = 0; g < GB; ++g) out[g * stride + i] = _mm512_reduce_add_ps(acc[g]) * sc;
  }
}

// out[g * D + d] = sum_i w[g * stride + i] * v_i[d], 64 columns at a time with GB x 4 accumulators in registers;
// the first column block streams the rows from memory, the others find them in L2 (320 rows of 1 KiB).
template <int GB, typename T>
void values_blocked(const float* w, int64_t stride, int64_t D, const T* const* rows, int64_t n, float* out) {
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    __m512 acc[GB][4];
    for (int g = 0; g < GB; ++g)
      for (int c = 0; c < 4; ++c) acc[g][c] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; ++i) {
      if (d0 == 0 && i + FAR < n) prefetch_row(rows[i + FAR], D);
      const T* v = rows[i] + d0;
      const __m512 v0 = load16(v), v1 = load16(v + 16);
      const __m512 v2 = load16(v + 32), v3 = load16(v + 48);
      for (int g = 0; g < GB; ++g) {
        const __m512 wg = _mm512_set1_ps(w[g * stride + i]);
        acc[g][0] = _mm512_fmadd_ps(wg, v0, acc[g][0]);
        acc[g][1] = _mm512_fmadd_ps(wg, v1, acc[g][1]);
        acc[g][2] = _mm512_fmadd_ps(wg, v2, acc[g][2]);
        acc[g][3] = _mm512_fmadd_ps(wg, v3, acc[g][3]);
      }
    }
    for (int g = 0; g < GB; ++g)
      for (int c = 0; c < 4; ++c) _mm512_storeu_ps(out + g * D + d0 + 16 * c, acc[g][c]);
  }
}

// Heads in blocks of up to four (Gemma 3: 4 query heads per KV head on the 270M and 1B, 2 on the 4B-27B).
template <typename F>
void for_head_blocks(int64_t G, F&& f) {
  for (int64_t g0 = 0; g0 < G; g0 += 4) {
    switch (std::min<int64_t>(4, G - g0)) {
      case 4: f(g0, std::integral_constant<int, 4>{}); break;
      case 3: f(g0, std::integral_constant<int, 3>{}); break;
      case 2: f(g0, std::integral_constant<int, 2>{}); break;
      default: f(g0, std::integral_constant<int, 1>{}); break;
    }
  }
}
#endif

// s[0..n) <- softmax(s), max-subtracted. The exps are vectorized where the CPU has AVX-512 (torch's SLEEF exp, 1-ulp
// accurate, as fused_layer_ops.cpp uses): a scalar exp per score was a large part of a decode step's attention at a
// few hundred keys per sequence.
inline void softmax(float* s, int64_t n) {
  const float m = *std::max_element(s, s + n);
  float total = 0.f;
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 mv = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  for (; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1);
    const __m512 e = Sleef_expf16_u10(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + i), mv));
    _mm512_mask_storeu_ps(s + i, k, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(k, e));
  }
  total = _mm512_reduce_add_ps(sum);
#endif
  for (; i < n; ++i) total += (s[i] = std::exp(s[i] - m));
  const float inv = 1.f / total;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] *= inv;
}

// scores[g * n + i] = scale * q_g . k_i for the G query heads sharing the key rows: the blocked path where the CPU and
// head dim allow it, else a portable loop (each key row read once for all G heads).
template <typename T>
void all_scores(const float* q, int64_t G, int64_t D, const std::vector<const T*>& rows, float sc, float* scores) {
  const int64_t n = static_cast<int64_t>(rows.size());
#if defined(__AVX512F__)
  if (D % 64 == 0) {
    for_head_blocks(G, [&](int64_t g0, auto gb) {
      scores_blocked<decltype(gb)::value, T>(q + g0 * D, D, rows.data(), n, sc, scores + g0 * n, n);
    });
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) {
    const T* k = rows[i];
    if (i + AHEAD < n) prefetch_row(rows[i + AHEAD], D);
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * D;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < D; ++d) s += qg[d] * to_float(k[d]);
      scores[g * n + i] = s * sc;
    }
  }
}

// acc[g * D + d] += sum_i w[g * n + i] * v_i[d] (acc starts at zero), blocked or portable as above.
template <typename T>
void all_values(const float* w, int64_t G, int64_t D, const std::vector<const T*>& rows, float* acc) {
  const int64_t n = static_cast<int64_t>(rows.size());
#if defined(__AVX512F__)
  if (D % 64 == 0) {
    for_head_blocks(G, [&](int64_t g0, auto gb) {
      values_blocked<decltype(gb)::value, T>(w + g0 * n, n, D, rows.data(), n, acc + g0 * D);
    });
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) {
    const T* v = rows[i];
    if (i + AHEAD < n) prefetch_row(rows[i + AHEAD], D);
    for (int64_t g = 0; g < G; ++g) {
      const float wg = w[g * n + i];
      float* a = acc + g * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) a[d] += wg * to_float(v[d]);
    }
  }
}

template <typename T>
void attend_all(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& pages,
                const at::Tensor& first_pos, const at::Tensor& key_lo, const at::Tensor& key_hi, float sc,
                at::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t P = k_cache.size(1), Hkv = k_cache.size(2), W = pages.size(1);
  const int64_t G = Hq / Hkv, page_stride = k_cache.stride(0), pos_stride = k_cache.stride(1);
  const float* qp = q.data_ptr<float>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  float* op = out.data_ptr<float>();
  const int64_t* pg = pages.data_ptr<int64_t>();
  const int64_t* fp = first_pos.data_ptr<int64_t>();
  const int64_t* lo_p = key_lo.data_ptr<int64_t>();
  const int64_t* hi_p = key_hi.data_ptr<int64_t>();

  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc;
    std::vector<const T*> k_rows, v_rows;
    for (int64_t work = begin; work < end; ++work) {
      const int64_t b = work / Hkv, h = work % Hkv;
      const int64_t lo = lo_p[b], n = hi_p[b] - lo;
      TORCH_CHECK(n > 0 && lo >= fp[b] && (hi_p[b] - 1 - fp[b]) / P < W, "key range outside the block table");
      // Row addresses once per sequence, shared by the score and value passes.
      k_rows.resize(n);
      v_rows.resize(n);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t rel = lo + i - fp[b];
        const int64_t off = pg[b * W + rel / P] * page_stride + (rel % P) * pos_stride + h * D;
        k_rows[i] = kp + off;
        v_rows[i] = vp + off;
      }
      scores.assign(G * n, 0.f);
      acc.assign(G * D, 0.f);
      const float* qb = qp + (b * Hq + h * G) * D;
      all_scores<T>(qb, G, D, k_rows, sc, scores.data());
      for (int64_t g = 0; g < G; ++g) softmax(scores.data() + g * n, n);
      all_values<T>(scores.data(), G, D, v_rows, acc.data());
      std::copy(acc.begin(), acc.end(), op + (b * Hq + h * G) * D);
    }
  });
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& pages, const at::Tensor& first_pos, const at::Tensor& key_lo,
                                  const at::Tensor& key_hi, double scale) {
  const auto kv_type = k_cache.scalar_type();
  TORCH_CHECK(q.scalar_type() == at::kFloat, "q must be fp32");
  TORCH_CHECK(kv_type == at::kFloat || kv_type == at::kBFloat16, "the KV cache must be fp32 or bf16");
  TORCH_CHECK(v_cache.scalar_type() == kv_type, "k_cache and v_cache must share a dtype");
  TORCH_CHECK(q.is_contiguous() && pages.is_contiguous(), "q and pages must be contiguous");
  TORCH_CHECK(k_cache.stride(3) == 1 && k_cache.stride(2) == k_cache.size(3) &&
                  k_cache.stride(1) == k_cache.size(2) * k_cache.size(3),
              "k_cache: last three dims must be contiguous");
  TORCH_CHECK(v_cache.strides() == k_cache.strides(), "k_cache and v_cache must share strides");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0 && k_cache.size(3) == q.size(2), "shape mismatch");
  auto out = at::empty_like(q);
  const float sc = static_cast<float>(scale);
  if (kv_type == at::kBFloat16) {
    attend_all<at::BFloat16>(q, k_cache, v_cache, pages, first_pos, key_lo, key_hi, sc, out);
  } else {
    attend_all<float>(q, k_cache, v_cache, pages, first_pos, key_lo, key_hi, sc, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(g3serve, m) {
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor pages, Tensor first_pos, "
      "Tensor key_lo, Tensor key_hi, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(g3serve, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
