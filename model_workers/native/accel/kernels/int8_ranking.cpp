// The LM head's int8 ranking GEMM (head_ranking.Int8Ranker) for decode-sized batches: y = bf16(fp32(x . q - 128 *
// sum(q)) * scale), x the hidden states' u8 codes (q_h + 128), q the head's int8 rows, as torch ops
// g3serve::int8_rank_pack / g3serve::int8_rank.
//
// Why: the ranking reads the 262,144 x 640 int8 head every decode step, and at 32 rows it is bound by the dot-product
// instructions, not by the 168 MB it reads. oneDNN's u8s8 GEMM (qlinear_pointwise) issued them at about half the
// rate the CPU sustains at 32 rows on AVX512-VNNI without AMX (benchmarks/decode_profile.py measures the head's share
// of a step). This kernel keeps a 12-row x 32-output block of int32 sums in registers, reads each weight panel once
// from DRAM (the next one prefetched, in slices spread over the row blocks), and reuses it from L1 for every row
// block. With AMX, oneDNN's tile GEMM is the faster one, and the accel package keeps it there.
//
// Same values as oneDNN's: the int32 sums are exact (|sum| < 640 * 255 * 127 < 2^31, and < 2^24 after the
// compensation, so its conversion to fp32 is exact too), then one fp32 multiply by the column's scale and one
// rounding to bf16, to nearest even (tests/unit/test_lm_head.py compares the two bit for bit).
//
// Layout: q [N, K] -> [N / 32, K / 4, 32, 4]: for each group of 4 inputs, the 32 outputs of a panel as two zmm
// vectors of 16 x 4 bytes, what VPDPBUSD multiplies with a broadcast 4-byte group of x.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define G3SERVE_INT8_RANK 1
#include <immintrin.h>
#endif

#include "panel_loop.h"  // for_panel_blocks
#include "simd_widen.h"  // store16

#include <algorithm>

namespace {

constexpr int64_t PANEL = 32;  // outputs per packed panel
constexpr int64_t GROUP = 4;   // inputs per VPDPBUSD lane
constexpr int64_t MR = 12;     // rows per register block

bool supported() {
#if defined(G3SERVE_INT8_RANK)
  return true;
#else
  return false;
#endif
}

#if defined(G3SERVE_INT8_RANK)
typedef int32_t int32_u __attribute__((aligned(1), may_alias));  // one group of 4 u8 inputs, read as one int32

// R rows x 32 outputs of one panel: int32 sums over K, then the compensation, the scale and the bf16 rounding.
// noinline: inlined into the parallel loop, GCC ran out of registers there and kept the sums on the stack.
template <int R>
__attribute__((noinline)) void block(const uint8_t* x, int64_t K, const int8_t* w, const int32_t* comp,
                                     const float* scale, at::BFloat16* y, int64_t N, const int8_t* next, int64_t phase,
                                     int64_t step) {
  __m512i lo[R], hi[R];
#pragma GCC unroll 12
  for (int m = 0; m < R; ++m) lo[m] = hi[m] = _mm512_setzero_si512();
  int64_t due = phase;  // prefetch every `step`-th line of the next panel from `phase`: spread over the row blocks
  for (int64_t g = 0; g < K / GROUP; ++g) {
    if (g == due) {
      _mm_prefetch(reinterpret_cast<const char*>(next + g * PANEL * GROUP), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(next + g * PANEL * GROUP + 64), _MM_HINT_T0);
      due += step;
    }
    const __m512i w0 = _mm512_loadu_si512(w + g * PANEL * GROUP);
    const __m512i w1 = _mm512_loadu_si512(w + g * PANEL * GROUP + 64);
    // VPDPBUSD through asm with "+v": with _mm512_dpbusd_epi32, GCC kept the 24 sums on the stack and loaded and
    // stored each one per use (the instruction has one form, its accumulator read and written); the unroll pragmas
    // let it hold the arrays in registers.
#pragma GCC unroll 12
    for (int m = 0; m < R; ++m) {
      const __m512i xb = _mm512_set1_epi32(*reinterpret_cast<const int32_u*>(x + m * K + g * GROUP));
      asm("vpdpbusd %2, %1, %0" : "+v"(lo[m]) : "v"(xb), "v"(w0));
      asm("vpdpbusd %2, %1, %0" : "+v"(hi[m]) : "v"(xb), "v"(w1));
    }
  }
  const __m512i c0 = _mm512_loadu_si512(comp), c1 = _mm512_loadu_si512(comp + 16);
  const __m512 s0 = _mm512_loadu_ps(scale), s1 = _mm512_loadu_ps(scale + 16);
#pragma GCC unroll 12
  for (int m = 0; m < R; ++m) {
    const __m512 v0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(lo[m], c0)), s0);
    const __m512 v1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(hi[m], c1)), s1);
    g3serve_simd::store16(y + m * N, v0);  // rounded to bf16, to nearest even
    g3serve_simd::store16(y + m * N + 16, v1);
  }
}

#endif

at::Tensor int8_rank_pack(const at::Tensor& q) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.device().is_cpu(), "q must be a CPU int8 [N, K]");
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK(N % PANEL == 0 && K % GROUP == 0, "int8_rank_pack needs N % 32 == 0 and K % 4 == 0");
  return q.reshape({N / PANEL, PANEL, K / GROUP, GROUP}).transpose(1, 2).contiguous();
}

at::Tensor int8_rank(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& comp, const at::Tensor& scale) {
  TORCH_CHECK(supported(), "int8_rank needs AVX512-VNNI (check int8_rank_supported() first)");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kByte, "x must be contiguous uint8 [M, K]");
  TORCH_CHECK(packed.dim() == 4 && packed.size(1) * GROUP == x.size(1) && packed.size(2) == PANEL &&
                  packed.size(3) == GROUP && packed.scalar_type() == at::kChar && packed.is_contiguous(),
              "packed does not fit x");
  const int64_t M = x.size(0), K = x.size(1), panels = packed.size(0), N = panels * PANEL;
  TORCH_CHECK(comp.numel() == N && comp.scalar_type() == at::kInt && comp.is_contiguous(), "comp: int32 [N]");
  TORCH_CHECK(scale.numel() == N && scale.scalar_type() == at::kFloat && scale.is_contiguous(), "scale: fp32 [N]");
  auto y = at::empty({M, N}, x.options().dtype(at::kBFloat16));
#if defined(G3SERVE_INT8_RANK)
  const uint8_t* xp = x.data_ptr<uint8_t>();
  const int8_t* wp = packed.data_ptr<int8_t>();
  const int32_t* cp = comp.data_ptr<int32_t>();
  const float* sp = scale.data_ptr<float>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const int64_t panel_bytes = K * PANEL;
  g3serve_panels::for_panel_blocks<MR>(panels, M, [&](int64_t p, int64_t b, int64_t blocks, auto rows) {
    const int8_t* next = wp + std::min(p + 1, panels - 1) * panel_bytes;
    block<rows>(xp + b * MR * K, K, wp + p * panel_bytes, cp + p * PANEL, sp + p * PANEL, yp + b * MR * N + p * PANEL,
                N, next, b, blocks);
  });
#endif
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(g3serve, m) {
  m.def("int8_rank_supported() -> bool", &supported);  // no tensor arguments: a catch-all kernel
  m.def("int8_rank_pack(Tensor q) -> Tensor");
  m.def("int8_rank(Tensor x, Tensor packed, Tensor comp, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(g3serve, CPU, m) {
  m.impl("int8_rank_pack", &int8_rank_pack);
  m.impl("int8_rank", &int8_rank);
}
