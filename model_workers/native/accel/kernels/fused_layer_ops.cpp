// The Gemma 3 layer's elementwise work fused into four CPU ops (torch custom ops, g3serve::*), computed in fp32.
//
// Why: between its GEMMs a layer runs some twenty small torch ops (RMSNorm alone is pow, mean, add, rsqrt, mul, mul),
// each a pass over memory with a fresh output tensor, so at prefill-chunk sizes they add up to a large share of the
// step (torch.profiler shows it; benchmarks/model_forward.py measures the forward). Here each is one pass, rows split
// over torch's thread pool. The arithmetic is the torch reference's, in its order per element
// (model_workers/gemma3/decoder.py `TorchLayerOps`); only the order of RMSNorm's sum of squares differs (vector
// lanes), so the two agree to float rounding.
//
//   rms_norm(x [T, H], w [H], eps)                 x * rsqrt(mean(x^2) + eps) * (1 + w)
//   add_rms_norm(r [T, H], y [T, H], w [H], eps)   r + rms_norm(y, w, eps)
//   qk_norm_rope(qkv [T, (nq + 2 nkv) D], qw [D], kw [D], cos [T, D], sin [T, D], nq, nkv, eps) -> (q, k)
//                                                  per-head RMSNorm of q and k, then RoPE (rotate-half form)
//   gelu_mul(gate_up [T, 2 I])                     gelu_tanh(gate) * up -> [T, I]
// No FMA contraction: each element is rounded as the torch reference rounds it (mul, mul, add).
//
// The bf16 mode's projections take and give bf16 (decoder.py), so the ops meet them in bf16 without a cast of their
// own: rms_norm writes bf16 when asked (`out_dtype`), add_rms_norm's branch, qk_norm_rope's qkv and gelu_mul's
// gate_up may be bf16 (gelu_mul then writes bf16 too). The arithmetic stays fp32: a bf16 input is widened exactly
// (to_float), a bf16 output is rounded once, to nearest even as torch's own cast rounds (from_float). So each op's
// output equals the fp32 op's on the widened input, cast by torch -- what the casts around the projections computed.
#pragma GCC optimize("fp-contract=off")

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "simd_widen.h"  // load16, and SLEEF's AVX-512 exp

#if defined(__AVX2__) && !defined(__AVX512F__)
#include <immintrin.h>
// torch's own vectorized exp, 8 lanes (SLEEF, exported by libtorch_cpu; 1-ulp accurate).
extern "C" __m256 Sleef_expf8_u10(__m256);
#endif

namespace {

// Rows per task: small decode batches (tens of rows) stay on one thread; prefill chunks split.
constexpr int64_t GRAIN = 16;

void check_fp32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a CPU float32 tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// fp32 or bf16 (the bf16 mode's projection outputs).
void check_act(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16), name,
              " must be a CPU float32 or bfloat16 tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

using bf16 = at::BFloat16;

#if defined(__AVX512F__)
using g3serve_simd::load16;   // 16 lanes of fp32 or bf16 as fp32 (simd_widen.h)
using g3serve_simd::store16;  // 16 fp32 lanes as fp32, or rounded to bf16 as torch's cast rounds (simd_widen.h)
#endif

using g3serve_simd::from_float;  // rows of fp32 rounded to bf16 (simd_widen.h)
using g3serve_simd::to_float;    // rows of bf16 widened to fp32 (simd_widen.h)

// A row of an fp32 or bf16 tensor as fp32: the row itself, or its widened copy in `scratch`.
inline const float* row_f32(const at::Tensor& t, int64_t offset, int64_t n, float* scratch) {
  if (t.scalar_type() == at::kFloat) return t.data_ptr<float>() + offset;
  to_float(t.data_ptr<bf16>() + offset, scratch, n);
  return scratch;
}

// Where an fp32 result row goes: straight into an fp32 output, or into `scratch`, then rounded into a bf16 one.
struct RowOut {
  at::Tensor& out;
  float* scratch;
  float* row(int64_t offset) const {
    return out.scalar_type() == at::kFloat ? out.data_ptr<float>() + offset : scratch;
  }
  void done(int64_t offset, int64_t n) const {
    if (out.scalar_type() == at::kBFloat16) from_float(scratch, out.data_ptr<bf16>() + offset, n);
  }
};

// 1 / sqrt(mean(x^2) + eps) over n values.
inline float inv_rms(const float* x, int64_t n, float eps) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += x[i] * x[i];
  return 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
}

// w1 = 1 + w, as the reference computes it once per call.
std::vector<float> one_plus(const at::Tensor& w) {
  const float* p = w.data_ptr<float>();
  std::vector<float> out(w.numel());
  for (int64_t i = 0; i < w.numel(); ++i) out[i] = 1.f + p[i];
  return out;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, std::optional<at::ScalarType> out_dtype) {
  check_fp32(x, "x");
  check_fp32(w, "w");
  const int64_t H = w.numel(), T = x.numel() / H;
  TORCH_CHECK(x.size(-1) == H, "x's last dim must match w");
  const auto dtype = out_dtype.value_or(at::kFloat);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "out_dtype must be float32 or bfloat16");
  auto out = at::empty_like(x, x.options().dtype(dtype));
  const auto w1 = one_plus(w);
  const float *xp = x.data_ptr<float>(), *wp = w1.data();
  at::parallel_for(0, T, GRAIN, [&](int64_t lo, int64_t hi) {
    std::vector<float> scratch(H);
    const RowOut sink{out, scratch.data()};
    for (int64_t t = lo; t < hi; ++t) {
      const float* xr = xp + t * H;
      float* orow = sink.row(t * H);
      const float r = inv_rms(xr, H, static_cast<float>(eps));
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) orow[i] = xr[i] * r * wp[i];
      sink.done(t * H, H);
    }
  });
  return out;
}

at::Tensor add_rms_norm(const at::Tensor& res, const at::Tensor& y, const at::Tensor& w, double eps) {
  check_fp32(res, "residual");
  check_act(y, "y");
  check_fp32(w, "w");
  const int64_t H = w.numel(), T = y.numel() / H;
  TORCH_CHECK(y.size(-1) == H && res.sizes() == y.sizes(), "residual and y must be [T, H] with H = w's size");
  auto out = at::empty_like(res);
  const auto w1 = one_plus(w);
  const float *rp = res.data_ptr<float>(), *wp = w1.data();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, GRAIN, [&](int64_t lo, int64_t hi) {
    std::vector<float> scratch(H);
    for (int64_t t = lo; t < hi; ++t) {
      const float *yr = row_f32(y, t * H, H, scratch.data()), *rr = rp + t * H;
      float* orow = op + t * H;
      const float r = inv_rms(yr, H, static_cast<float>(eps));
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) orow[i] = rr[i] + yr[i] * r * wp[i];
    }
  });
  return out;
}

// One head: RMSNorm by (1 + w), then out[d] = n[d] cos[d] + rot[d] sin[d] with rot = (-n[half:], n[:half]).
inline void norm_rope_head(const float* x, const float* w1, const float* c, const float* s, int64_t D, float eps,
                           float* out, float* scratch) {
  const float r = inv_rms(x, D, eps);
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) scratch[d] = x[d] * r * w1[d];
  const int64_t half = D / 2;
#pragma omp simd
  for (int64_t d = 0; d < half; ++d) out[d] = scratch[d] * c[d] + (-scratch[d + half]) * s[d];
#pragma omp simd
  for (int64_t d = half; d < D; ++d) out[d] = scratch[d] * c[d] + scratch[d - half] * s[d];
}

std::tuple<at::Tensor, at::Tensor> qk_norm_rope(const at::Tensor& qkv, const at::Tensor& qw, const at::Tensor& kw,
                                                const at::Tensor& cos, const at::Tensor& sin, int64_t nq,
                                                int64_t nkv, double eps) {
  check_act(qkv, "qkv");
  for (auto [t, n] : {std::pair{&qw, "q_norm"}, {&kw, "k_norm"}, {&cos, "cos"}, {&sin, "sin"}}) check_fp32(*t, n);
  const int64_t D = qw.numel(), T = qkv.size(0), width = (nq + 2 * nkv) * D;
  TORCH_CHECK(D % 2 == 0 && kw.numel() == D, "q_norm and k_norm must have the (even) head dim");
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == width, "qkv must be [T, (nq + 2 nkv) * head_dim]");
  TORCH_CHECK(cos.numel() == T * D && sin.numel() == T * D, "cos and sin must be [T, head_dim]");
  // q and k are fp32 whatever qkv's dtype: the attention takes an fp32 query, and k is rounded (or not) by the cache
  auto q = at::empty({T, nq, D}, qkv.options().dtype(at::kFloat));
  auto k = at::empty({T, nkv, D}, qkv.options().dtype(at::kFloat));
  const auto qw1 = one_plus(qw), kw1 = one_plus(kw);
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, T, GRAIN, [&](int64_t lo, int64_t hi) {
    std::vector<float> scratch(D), wide((nq + nkv) * D);
    for (int64_t t = lo; t < hi; ++t) {
      // the q and k heads of the row (v is not read here)
      const float *row = row_f32(qkv, t * width, (nq + nkv) * D, wide.data()), *c = cp + t * D, *s = sp + t * D;
      for (int64_t h = 0; h < nq; ++h) norm_rope_head(row + h * D, qw1.data(), c, s, D, e, qp + (t * nq + h) * D, scratch.data());
      for (int64_t h = 0; h < nkv; ++h)
        norm_rope_head(row + (nq + h) * D, kw1.data(), c, s, D, e, kp + (t * nkv + h) * D, scratch.data());
    }
  });
  return {q, k};
}

// gelu_tanh(g) * u. 0.5 g (1 + tanh(z)) = g / (1 + exp(-2 z)) with z = b (g + k g^3): the same function in one exp
// and one division instead of a tanh (SLEEF's vector tanh is far dearer than an exp and was most of this op's time);
// it differs from the reference's rounding by a few ulp. Large |z| saturate correctly: exp -> inf gives -0, exp -> 0
// gives g. AVX-512: 8 vectors per pass on simd_widen.h's inlined exp, so their exp chains overlap (SLEEF's exp is a
// call). Both forms take the same exp, so the bf16 form stays the fp32 one's result rounded once.
constexpr float kBeta = static_cast<float>(M_SQRT2 * M_2_SQRTPI * 0.5);
constexpr float kKappa = 0.044715f;

// T: float, or bf16 (read widened, the result rounded once; the AVX2 and scalar builds take the scalar loop for it).
template <typename T>
inline void gelu_mul_row(const T* g, const T* u, T* out, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  using g3serve_simd::exp16;
  const __m512 beta = _mm512_set1_ps(kBeta), kappa = _mm512_set1_ps(kKappa), minus_two = _mm512_set1_ps(-2.f),
               one = _mm512_set1_ps(1.f);
  auto exponent = [&](__m512 x) {  // -2 z
    const __m512 cube = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
    return _mm512_mul_ps(minus_two, _mm512_mul_ps(beta, _mm512_add_ps(x, _mm512_mul_ps(kappa, cube))));
  };
  constexpr int U = 8;
  for (; i + 16 * U <= n; i += 16 * U) {
    __m512 x[U], e[U];
    for (int k = 0; k < U; ++k) e[k] = exponent(x[k] = load16(g + i + 16 * k));
    for (int k = 0; k < U; ++k) e[k] = exp16(e[k]);
    for (int k = 0; k < U; ++k)
      store16(out + i + 16 * k, _mm512_mul_ps(_mm512_div_ps(x[k], _mm512_add_ps(one, e[k])), load16(u + i + 16 * k)));
  }
  for (; i + 16 <= n; i += 16) {
    const __m512 x = load16(g + i);
    const __m512 act = _mm512_div_ps(x, _mm512_add_ps(one, exp16(exponent(x))));
    store16(out + i, _mm512_mul_ps(act, load16(u + i)));
  }
#elif defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
  const __m256 beta = _mm256_set1_ps(kBeta), kappa = _mm256_set1_ps(kKappa), minus_two = _mm256_set1_ps(-2.f),
               one = _mm256_set1_ps(1.f);
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(g + i);
    const __m256 cube = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
    const __m256 inner = _mm256_mul_ps(beta, _mm256_add_ps(x, _mm256_mul_ps(kappa, cube)));
    const __m256 act = _mm256_div_ps(x, _mm256_add_ps(one, Sleef_expf8_u10(_mm256_mul_ps(minus_two, inner))));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(act, _mm256_loadu_ps(u + i)));
  }
  }
#endif
  for (; i < n; ++i) {
    const float x = static_cast<float>(g[i]);
    out[i] = T(x / (1.f + std::exp(-2.f * (kBeta * (x + kKappa * (x * x * x))))) * static_cast<float>(u[i]));
  }
}

// The output has gate_up's dtype (bf16 in the bf16 mode: the down projection's input).
at::Tensor gelu_mul(const at::Tensor& gate_up) {
  check_act(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "gate_up must be [T, 2 * intermediate]");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  auto out = at::empty({T, I}, gate_up.options());
  // Split by rows, or by column blocks when there are few rows (a decode step of a handful of sequences).
  constexpr int64_t COLS = 512;
  const int64_t blocks = (I + COLS - 1) / COLS;
  auto rows = [&](auto* in, auto* op) {
    at::parallel_for(0, T * blocks, 4, [&](int64_t lo, int64_t hi) {
      for (int64_t j = lo; j < hi; ++j) {
        const int64_t t = j / blocks, c0 = (j % blocks) * COLS, n = std::min(COLS, I - c0);
        gelu_mul_row(in + t * 2 * I + c0, in + t * 2 * I + I + c0, op + t * I + c0, n);
      }
    });
  };
  if (gate_up.scalar_type() == at::kFloat)
    rows(gate_up.data_ptr<float>(), out.data_ptr<float>());
  else
    rows(gate_up.data_ptr<bf16>(), out.data_ptr<bf16>());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(g3serve, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps, ScalarType? out_dtype=None) -> Tensor");
  m.def("add_rms_norm(Tensor residual, Tensor y, Tensor w, float eps) -> Tensor");
  m.def(
      "qk_norm_rope(Tensor qkv, Tensor q_w, Tensor k_w, Tensor cos, Tensor sin, int nq, int nkv, float eps) "
      "-> (Tensor, Tensor)");
  m.def("gelu_mul(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(g3serve, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("qk_norm_rope", &qk_norm_rope);
  m.impl("gelu_mul", &gelu_mul);
}
