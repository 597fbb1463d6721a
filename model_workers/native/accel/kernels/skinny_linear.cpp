// fp32 projections for decode-sized batches (up to packed_linear.py's SKINNY_MAX_ROWS): y = x W^T with W packed
// once, as torch ops
// g3serve::skinny_pack / g3serve::skinny_linear.
//
// Why: at 32 rows the layer GEMMs of the Gemma 3 270M stream 400 MB of fp32 weights per decode step, each byte used
// by only 32 rows, so the step is bound by how fast the weights arrive, not by FLOPs. oneDNN's packed GEMM (the
// prefill path) is built for many rows and, at decode sizes with the weights coming from DRAM, reads them well below
// what the memory system delivers. This kernel reads each weight panel once, as one sequential stream per thread,
// and prefetches the next panel into L2 in slices spread over the whole panel's compute, so the weight stream, not
// the kernel, bounds it (benchmarks/decode_profile.py measures the projections' share of a step; docs/benchmarks.md).
// Other prefetch hints, distances and row blocks were tried and were no better; the ones here are the simplest.
//
// Layout: W [N, K] -> [N / 32, K, 32]: for each k, the 32 outputs of a panel are two adjacent zmm vectors.
// Register block: 12 rows x 32 outputs = 24 accumulators; every x value is broadcast once for both vectors.
// The sums run over k in order with one FMA per term (no reassociation): fp32 throughout, like F.linear, whose
// summation order differs (outputs agree to float rounding).
#pragma GCC optimize("fp-contract=off")  // the int8 path's w = scale * q - min: a multiply then a subtract, no FMA
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "panel_loop.h"  // for_panel_blocks, with_rows

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t PANEL = 32;  // outputs per packed panel
constexpr int64_t MR = 12;     // rows per register block
constexpr int64_t SUB = 16;    // int8 weights: one (scale, min) per output per SUB inputs (gguf_int8.SUB)

#if defined(__AVX512F__)
// acc += x[rows, k] * w[k, 32 outputs] for R rows: every x value is broadcast once for both output vectors.
template <int R>
inline void fma_rows(__m512* lo, __m512* hi, const float* x, int64_t K, int64_t k, __m512 w0, __m512 w1) {
  for (int m = 0; m < R; ++m) {
    const __m512 xb = _mm512_set1_ps(x[m * K + k]);
    lo[m] = _mm512_fmadd_ps(xb, w0, lo[m]);
    hi[m] = _mm512_fmadd_ps(xb, w1, hi[m]);
  }
}

template <int R>
inline void store_rows(const __m512* lo, const __m512* hi, float* y, int64_t N) {
  for (int m = 0; m < R; ++m) {
    _mm512_storeu_ps(y + m * N, lo[m]);
    _mm512_storeu_ps(y + m * N + 16, hi[m]);
  }
}

// rows x 32 outputs of one panel; prefetches every `step`-th k line (from `phase`) of the next panel into L2.
template <int R>
inline void block(const float* x, int64_t K, const float* w, float* y, int64_t N, const char* next, int64_t stride,
                  int64_t phase, int64_t step) {
  __m512 lo[R], hi[R];
  for (int m = 0; m < R; ++m) lo[m] = hi[m] = _mm512_setzero_ps();
  int64_t due = phase;  // a running target, not k % step: no integer division in the inner loop
  for (int64_t k = 0; k < K; ++k) {
    if (k == due) {
      _mm_prefetch(next + k * stride, _MM_HINT_T1);
      _mm_prefetch(next + k * stride + 64, _MM_HINT_T1);
      due += step;
    }
    fma_rows<R>(lo, hi, x, K, k, _mm512_loadu_ps(w + k * PANEL), _mm512_loadu_ps(w + k * PANEL + 16));
  }
  store_rows<R>(lo, hi, y, N);
}

// The int8 form (gguf_int8.py): q [N / 32, K, 32] int8, scale/minv [N / 32, K / SUB, 32]. The first row block
// rebuilds each weight in registers, w = fl(scale * q) - min (the checkpoint's fp32 weight bit for bit: the same
// two roundings as gguf's dequantize), uses it, and leaves the panel in `buf` (L2) for the other row blocks.
// Why: 1.5 bytes per weight arrive from DRAM instead of 4, and the weight stream bounds decode
// (benchmarks/decode_profile.py measures the step).
template <int R>
inline void block_int8(const float* x, int64_t K, const int8_t* q, const float* sc, const float* mn, float* buf,
                       float* y, int64_t N, const int8_t* next) {
  __m512 lo[R], hi[R];
  for (int m = 0; m < R; ++m) lo[m] = hi[m] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < K / SUB; ++kb) {
    for (int64_t line = 0; line < SUB * PANEL; line += 64)  // the next panel's same 16 inputs: 8 lines into L2
      _mm_prefetch(reinterpret_cast<const char*>(next + kb * SUB * PANEL + line), _MM_HINT_T1);
    const __m512 s0 = _mm512_loadu_ps(sc + kb * PANEL), s1 = _mm512_loadu_ps(sc + kb * PANEL + 16);
    const __m512 m0 = _mm512_loadu_ps(mn + kb * PANEL), m1 = _mm512_loadu_ps(mn + kb * PANEL + 16);
    for (int64_t k = kb * SUB; k < (kb + 1) * SUB; ++k) {
      const __m128i* qk = reinterpret_cast<const __m128i*>(q + k * PANEL);
      const __m512 f0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(qk)));
      const __m512 f1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(qk + 1)));
      const __m512 w0 = _mm512_sub_ps(_mm512_mul_ps(s0, f0), m0), w1 = _mm512_sub_ps(_mm512_mul_ps(s1, f1), m1);
      _mm512_storeu_ps(buf + k * PANEL, w0);
      _mm512_storeu_ps(buf + k * PANEL + 16, w1);
      fma_rows<R>(lo, hi, x, K, k, w0, w1);
    }
  }
  store_rows<R>(lo, hi, y, N);
}

using g3serve_panels::with_rows;
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
  g3serve_panels::for_panel_blocks<MR>(panels, M, [&](int64_t p, int64_t b, int64_t blocks, auto rows) {
    const char* next = reinterpret_cast<const char*>(wp + std::min(p + 1, panels - 1) * K * PANEL);
    block<rows>(xp + b * MR * K, K, wp + p * K * PANEL, yp + b * MR * N + p * PANEL, N, next, PANEL * 4, b, blocks);
  });
#endif
  return y;
}

at::Tensor skinny_int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                             const at::Tensor& minv) {
  TORCH_CHECK(supported(), "skinny_int8_linear needs AVX-512 (check skinny_supported() first)");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat, "x must be contiguous fp32 [M, K]");
  TORCH_CHECK(q.dim() == 3 && q.size(2) == PANEL && q.size(1) == x.size(1) && q.scalar_type() == at::kChar &&
                  q.is_contiguous(),
              "q does not fit x");
  const int64_t M = x.size(0), K = x.size(1), panels = q.size(0), N = panels * PANEL;
  TORCH_CHECK(K % SUB == 0, "in_features must be a multiple of ", SUB);
  for (const at::Tensor* t : {&scale, &minv})
    TORCH_CHECK(t->dim() == 3 && t->size(0) == panels && t->size(1) == K / SUB && t->size(2) == PANEL &&
                    t->scalar_type() == at::kFloat && t->is_contiguous(),
                "scale/minv do not fit q");
  auto y = at::empty({M, N}, x.options());
#if defined(__AVX512F__)
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* mp = minv.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t blocks = (M + MR - 1) / MR, subs = K / SUB;
  at::parallel_for(0, panels, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> buf(K * PANEL);  // one panel in fp32, rebuilt by the first row block (L2-resident)
    const char* own = reinterpret_cast<const char*>(buf.data());
    for (int64_t p = lo; p < hi; ++p) {
      const int8_t* next = qp + std::min(p + 1, panels - 1) * K * PANEL;
      with_rows<MR>(std::min(MR, M), [&](auto r) {
        block_int8<r>(xp, K, qp + p * K * PANEL, sp + p * subs * PANEL, mp + p * subs * PANEL, buf.data(),
                      yp + p * PANEL, N, next);
      });
      for (int64_t b = 1; b < blocks; ++b) {  // (their prefetch hint points at the panel they read: a no-op)
        const int64_t r0 = b * MR, rows = std::min(MR, M - r0);
        with_rows<MR>(rows, [&](auto r) {
          block<r>(xp + r0 * K, K, buf.data(), yp + r0 * N + p * PANEL, N, own, PANEL * 4, 0, K);
        });
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
  m.def("skinny_int8_linear(Tensor x, Tensor q, Tensor scale, Tensor minv) -> Tensor");
}

TORCH_LIBRARY_IMPL(g3serve, CPU, m) {
  m.impl("skinny_pack", &skinny_pack);
  m.impl("skinny_linear", &skinny_linear);
  m.impl("skinny_int8_linear", &skinny_int8_linear);
}
