// bf16 projections for decode-sized batches (the bf16 mode's, up to packed_linear.py's SKINNY_MAX_ROWS): y = x W^T,
// x and W bf16, sums in fp32, y rounded to bf16, with W packed once, as torch ops g3serve::skinny_bf16_pack /
// g3serve::skinny_bf16_linear.
//
// Why: at 32 rows oneDNN's bf16 GEMM issued the bf16 dot-product instruction at about two thirds of the rate the CPU
// sustains (benchmarks/decode_profile.py measures the projections' share of a step). This kernel keeps a 12-row x
// 32-output block of fp32 sums in registers, reads each weight panel once from DRAM (the next one prefetched, in
// slices spread over the row blocks), and reuses it from cache for every row block.
//
// Arithmetic: VDPBF16PS adds the two exact products of each bf16 pair to the fp32 sum, in order, rounding to nearest
// even; the sums run over the inputs in order; the output is rounded to bf16 once, to nearest even. That is fp32
// accumulation of exact bf16 products, as oneDNN's (tests/unit/test_packed_linear.py compares the two).
//
// Layout: W [N, K] -> [N / 32, K / 2, 32, 2]: for each pair of inputs, the 32 outputs of a panel as two zmm vectors
// of 16 x 2 bf16, what VDPBF16PS multiplies with a broadcast pair of x.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define G3SERVE_SKINNY_BF16 1
#include <immintrin.h>
#endif

#include "panel_loop.h"  // for_panel_blocks

#include <algorithm>

namespace {

constexpr int64_t PANEL = 32;  // outputs per packed panel
constexpr int64_t PAIR = 2;    // inputs per VDPBF16PS lane
constexpr int64_t MR = 12;     // rows per register block

bool supported() {
#if defined(G3SERVE_SKINNY_BF16)
  return true;
#else
  return false;
#endif
}

#if defined(G3SERVE_SKINNY_BF16)
typedef int32_t pair_u __attribute__((aligned(1), may_alias));  // one pair of bf16 inputs, read as one int32

// R rows x 32 outputs of one panel. noinline: inlined into the parallel loop, GCC kept the sums on the stack.
template <int R>
__attribute__((noinline)) void block(const uint16_t* x, int64_t K, const uint16_t* w, uint16_t* y, int64_t N,
                                     const uint16_t* next, int64_t phase, int64_t step) {
  __m512 lo[R], hi[R];
#pragma GCC unroll 12
  for (int m = 0; m < R; ++m) lo[m] = hi[m] = _mm512_setzero_ps();
  int64_t due = phase;  // prefetch every `step`-th pair of the next panel from `phase`: spread over the row blocks
  for (int64_t g = 0; g < K / PAIR; ++g) {
    if (g == due) {
      _mm_prefetch(reinterpret_cast<const char*>(next + g * PANEL * PAIR), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(next + g * PANEL * PAIR + 32), _MM_HINT_T0);
      due += step;
    }
    const __m512i w0 = _mm512_loadu_si512(w + g * PANEL * PAIR);
    const __m512i w1 = _mm512_loadu_si512(w + g * PANEL * PAIR + 32);
    // VDPBF16PS through asm with "+v": with _mm512_dpbf16_ps GCC copied the sums through the stack at every use
    // (the instruction has one form, its accumulator read and written).
#pragma GCC unroll 12
    for (int m = 0; m < R; ++m) {
      const __m512i xb = _mm512_set1_epi32(*reinterpret_cast<const pair_u*>(x + m * K + g * PAIR));
      asm("vdpbf16ps %2, %1, %0" : "+v"(lo[m]) : "v"(xb), "v"(w0));
      asm("vdpbf16ps %2, %1, %0" : "+v"(hi[m]) : "v"(xb), "v"(w1));
    }
  }
#pragma GCC unroll 12
  for (int m = 0; m < R; ++m) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + m * N), (__m256i)_mm512_cvtneps_pbh(lo[m]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + m * N + 16), (__m256i)_mm512_cvtneps_pbh(hi[m]));
  }
}

#endif

at::Tensor skinny_bf16_pack(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.device().is_cpu(), "w must be a CPU bf16 [N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(N % PANEL == 0 && K % PAIR == 0, "skinny_bf16_pack needs N % 32 == 0 and K % 2 == 0");
  return w.reshape({N / PANEL, PANEL, K / PAIR, PAIR}).transpose(1, 2).contiguous();
}

at::Tensor skinny_bf16_linear(const at::Tensor& x, const at::Tensor& packed) {
  TORCH_CHECK(supported(), "skinny_bf16_linear needs AVX512-BF16 (check skinny_bf16_supported() first)");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16, "x must be contiguous bf16 [M, K]");
  TORCH_CHECK(packed.dim() == 4 && packed.size(1) * PAIR == x.size(1) && packed.size(2) == PANEL &&
                  packed.size(3) == PAIR && packed.scalar_type() == at::kBFloat16 && packed.is_contiguous(),
              "packed does not fit x");
  const int64_t M = x.size(0), K = x.size(1), panels = packed.size(0), N = panels * PANEL;
  auto y = at::empty({M, N}, x.options());
#if defined(G3SERVE_SKINNY_BF16)
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const int64_t panel_elems = K * PANEL;
  g3serve_panels::for_panel_blocks<MR>(panels, M, [&](int64_t p, int64_t b, int64_t blocks, auto rows) {
    const uint16_t* next = wp + std::min(p + 1, panels - 1) * panel_elems;
    block<rows>(xp + b * MR * K, K, wp + p * panel_elems, yp + b * MR * N + p * PANEL, N, next, b, blocks);
  });
#endif
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(g3serve, m) {
  m.def("skinny_bf16_supported() -> bool", &supported);  // no tensor arguments: a catch-all kernel
  m.def("skinny_bf16_pack(Tensor w) -> Tensor");
  m.def("skinny_bf16_linear(Tensor x, Tensor packed) -> Tensor");
}

TORCH_LIBRARY_IMPL(g3serve, CPU, m) {
  m.impl("skinny_bf16_pack", &skinny_bf16_pack);
  m.impl("skinny_bf16_linear", &skinny_bf16_linear);
}
