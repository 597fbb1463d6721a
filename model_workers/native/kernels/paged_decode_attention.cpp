// Decode attention straight from the paged KV cache (one query token per sequence, fp32), as a torch custom op.
//
// Why: the torch path gathers every decoding sequence's pages into a contiguous copy per layer and then runs SDPA,
// so each key/value byte is read, written and read again. Here each (sequence, kv head) reads its keys and values
// once, in place, for all the query heads that share them (GQA), and torch's own thread pool splits the work.
//
//   q         [B, Hq, D]           contiguous
//   k_cache   [N, P, Hkv, D]       v_cache likewise; last three dims contiguous, any page stride
//   pages     [B, W] int64         page ids of each sequence's blocks; pages[b][0] holds position first_pos[b]
//   first_pos [B] int64            absolute position of slot 0 of pages[b][0] (a multiple of P)
//   key_lo    [B] int64            first key position attended (0, or the sliding window's start)
//   key_hi    [B] int64            one past the last key position (the query's own position + 1)
//   returns   [B, Hq, D]
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// A page's rows are contiguous but pages are scattered, and hardware prefetchers stop at 4 KiB boundaries (4 rows
// of a 256-wide head): software-prefetch the row AHEAD positions on while this one is used. Measured at 32
// sequences x 320 keys x 18 layers on 2 cores: 34 -> 24.5 ms (11 -> 15 GB/s); 2, 4 and 8 ahead alike.
constexpr int64_t AHEAD = 4;
inline void prefetch_row(const float* p, int64_t D) {
  for (int64_t d = 0; d < D; d += 16) __builtin_prefetch(p + d, 0, 3);  // one 64-byte line per 16 floats
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& pages, const at::Tensor& first_pos, const at::Tensor& key_lo,
                                  const at::Tensor& key_hi, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat, "fp32 only");
  TORCH_CHECK(q.is_contiguous() && pages.is_contiguous(), "q and pages must be contiguous");
  TORCH_CHECK(k_cache.stride(3) == 1 && k_cache.stride(2) == k_cache.size(3) &&
                  k_cache.stride(1) == k_cache.size(2) * k_cache.size(3),
              "k_cache: last three dims must be contiguous");
  TORCH_CHECK(v_cache.strides() == k_cache.strides(), "k_cache and v_cache must share strides");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t P = k_cache.size(1), Hkv = k_cache.size(2), W = pages.size(1);
  TORCH_CHECK(Hq % Hkv == 0 && k_cache.size(3) == D, "shape mismatch");
  const int64_t G = Hq / Hkv, page_stride = k_cache.stride(0), pos_stride = k_cache.stride(1);
  auto out = at::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t* pg = pages.data_ptr<int64_t>();
  const int64_t* fp = first_pos.data_ptr<int64_t>();
  const int64_t* lo_p = key_lo.data_ptr<int64_t>();
  const int64_t* hi_p = key_hi.data_ptr<int64_t>();
  const float sc = static_cast<float>(scale);

  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc;
    for (int64_t work = begin; work < end; ++work) {
      const int64_t b = work / Hkv, h = work % Hkv;
      const int64_t lo = lo_p[b], n = hi_p[b] - lo;
      TORCH_CHECK(n > 0 && lo >= fp[b] && (hi_p[b] - 1 - fp[b]) / P < W, "key range outside the block table");
      scores.assign(G * n, 0.f);
      acc.assign(G * D, 0.f);
      const float* qb = qp + (b * Hq + h * G) * D;
      auto row = [&](const float* base, int64_t pos) {
        const int64_t rel = pos - fp[b];
        return base + pg[b * W + rel / P] * page_stride + (rel % P) * pos_stride + h * D;
      };
      for (int64_t i = 0; i < n; ++i) {  // scores: every key row read once for the G query heads
        const float* k = row(kp, lo + i);
        if (i + AHEAD < n) prefetch_row(row(kp, lo + i + AHEAD), D);
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qb + g * D;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < D; ++d) s += qg[d] * k[d];
          scores[g * n + i] = s * sc;
        }
      }
      for (int64_t g = 0; g < G; ++g) {  // softmax, max-subtracted
        float* s = scores.data() + g * n;
        const float m = *std::max_element(s, s + n);
        float total = 0.f;
        for (int64_t i = 0; i < n; ++i) total += (s[i] = std::exp(s[i] - m));
        const float inv = 1.f / total;
        for (int64_t i = 0; i < n; ++i) s[i] *= inv;
      }
      for (int64_t i = 0; i < n; ++i) {  // weighted values: every value row read once
        const float* v = row(vp, lo + i);
        if (i + AHEAD < n) prefetch_row(row(vp, lo + i + AHEAD), D);
        for (int64_t g = 0; g < G; ++g) {
          const float w = scores[g * n + i];
          float* a = acc.data() + g * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) a[d] += w * v[d];
        }
      }
      std::copy(acc.begin(), acc.end(), op + (b * Hq + h * G) * D);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(g3serve, m) {
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor pages, Tensor first_pos, "
      "Tensor key_lo, Tensor key_hi, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(g3serve, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
