// fp32 projections for decode-sized batches (a few to ~100 rows): y = x W^T with W packed once, as torch ops
// g3serve::skinny_pack / g3serve::skinny_linear.
//
// Why: at 32 rows the layer GEMMs of the Gemma 3 270M stream 400 MB of fp32 weights per decode step, each byte used
// by only 32 rows, so the step is bound by how fast the weights arrive, not by FLOPs. oneDNN's packed GEMM (the
// prefill path, 345 GFLOP/s at 512 rows here) reached ~160 GFLOP/s = 10 GB/s at 32 rows with the weights coming
// from DRAM. This kernel reads each weight panel once, as one sequential stream per thread, and prefetches the next
// panel into L2 in slices spread over the whole panel's compute: 18 layers x 4 projections at 32 rows 39.7 -> 31 ms
// on 2 cores of an Intel Xeon (AVX-512), ahead of oneDNN from 4 to 96 rows (benchmarks/decode_profile.py, docs).
// With the weights in cache it runs at ~300 GFLOP/s (oneDNN ~215); from DRAM the weight stream bounds it (~13 GB/s
// of the ~24 a plain sequential read gets here). Measured alike: prefetch hints T0/T1/T2, 2-8 panels ahead (slower),
// 8- or 14-row blocks.
//
// Layout: W [N, K] -> [N / 32, K, 32]: for each k, the 32 outputs of a panel are two adjacent zmm vectors.
// Register block: 12 rows x 32 outputs = 24 accumulators; every x value is broadcast once for both vectors.
// The sums run over k in order with one FMA per term (no reassociation): fp32 throughout, like F.linear, whose
// summation order differs (outputs agree to float rounding, ~1e-6 relative).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>

namespace {

constexpr int64_t PANEL = 32;  // outputs per packed panel
constexpr int64_t MR = 12;     // rows per register block

#if defined(__AVX512F__)
// rows x 32 outputs of one panel; prefetches every `step`-th k line (from `phase`) of the next panel into L2.
template <int R>
inline void block(const float* x, int64_t K, const float* w, float* y, int64_t N, const float* next, int64_t phase,
                  int64_t step) {
  __m512 lo[R], hi[R];
  for (int m = 0; m < R; ++m) lo[m] = hi[m] = _mm512_setzero_ps();
  int64_t due = phase;  // a running target, not k % step: no integer division in the inner loop
  for (int64_t k = 0; k < K; ++k) {
    if (k == due) {
      _mm_prefetch(reinterpret_cast<const char*>(next + k * PANEL), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(next + k * PANEL + 16), _MM_HINT_T1);
      due += step;
    }
    const __m512 w0 = _mm512_loadu_ps(w + k * PANEL), w1 = _mm512_loadu_ps(w + k * PANEL + 16);
    for (int m = 0; m < R; ++m) {
      const __m512 xb = _mm512_set1_ps(x[m * K + k]);
      lo[m] = _mm512_fmadd_ps(xb, w0, lo[m]);
      hi[m] = _mm512_fmadd_ps(xb, w1, hi[m]);
    }
  }
  for (int m = 0; m < R; ++m) {
    _mm512_storeu_ps(y + m * N, lo[m]);
    _mm512_storeu_ps(y + m * N + 16, hi[m]);
  }
}

// The row count of the last block is a runtime value: dispatch it to the template instance.
template <int R>
inline void block_rows(int64_t rows, const float* x, int64_t K, const float* w, float* y, int64_t N, const float* next,
                       int64_t phase, int64_t step) {
  if constexpr (R > 0) {
    if (rows == R) return block<R>(x, K, w, y, N, next, phase, step);
    block_rows<R - 1>(rows, x, K, w, y, N, next, phase, step);
  }
}
#endif

bool supported() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

at::Tensor skinny_pack(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.device().is_cpu(), "w must be a CPU fp32 [N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(N % PANEL == 0, "out_features must be a multiple of ", PANEL);
  return w.reshape({N / PANEL, PANEL, K}).transpose(1, 2).contiguous();
}

at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& packed) {
  TORCH_CHECK(supported(), "skinny_linear needs AVX-512 (check skinny_supported() first)");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat, "x must be contiguous fp32 [M, K]");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == PANEL && packed.size(1) == x.size(1), "packed does not fit x");
  const int64_t M = x.size(0), K = x.size(1), panels = packed.size(0), N = panels * PANEL;
  auto y = at::empty({M, N}, x.options());
#if defined(__AVX512F__)
  const float* xp = x.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t blocks = (M + MR - 1) / MR;
  // Threads take contiguous runs of panels: one sequential weight stream each.
  at::parallel_for(0, panels, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      const float* w = wp + p * K * PANEL;
      const float* next = wp + std::min(p + 1, panels - 1) * K * PANEL;
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t r0 = b * MR, rows = std::min(MR, M - r0);
        block_rows<MR>(rows, xp + r0 * K, K, w, yp + r0 * N + p * PANEL, N, next, b, blocks);
      }
    }
  });
#endif
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(g3serve, m) {
  m.def("skinny_supported() -> bool", &supported);  // no tensor arguments: a catch-all kernel
  m.def("skinny_pack(Tensor w) -> Tensor");
  m.def("skinny_linear(Tensor x, Tensor packed) -> Tensor");
}

TORCH_LIBRARY_IMPL(g3serve, CPU, m) {
  m.impl("skinny_pack", &skinny_pack);
  m.impl("skinny_linear", &skinny_linear);
}
