// The Gemma 3 layer's elementwise work fused into four fp32 CPU ops (torch custom ops, g3serve::*).
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
#pragma GCC optimize("fp-contract=off")

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

// torch's own vectorized exp (SLEEF, exported by libtorch_cpu; 1-ulp accurate).
extern "C" {
#if defined(__AVX512F__)
__m512 Sleef_expf16_u10(__m512);
#elif defined(__AVX2__)
__m256 Sleef_expf8_u10(__m256);
#endif
}

namespace {

// Rows per task: small decode batches (tens of rows) stay on one thread; prefill chunks split.
constexpr int64_t GRAIN = 16;

void check_fp32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a CPU float32 tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

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

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_fp32(x, "x");
  check_fp32(w, "w");
  const int64_t H = w.numel(), T = x.numel() / H;
  TORCH_CHECK(x.size(-1) == H, "x's last dim must match w");
  auto out = at::empty_like(x);
  const auto w1 = one_plus(w);
  const float *xp = x.data_ptr<float>(), *wp = w1.data();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, GRAIN, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const float* xr = xp + t * H;
      float* orow = op + t * H;
      const float r = inv_rms(xr, H, static_cast<float>(eps));
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) orow[i] = xr[i] * r * wp[i];
    }
  });
  return out;
}

at::Tensor add_rms_norm(const at::Tensor& res, const at::Tensor& y, const at::Tensor& w, double eps) {
  check_fp32(res, "residual");
  check_fp32(y, "y");
  check_fp32(w, "w");
  const int64_t H = w.numel(), T = y.numel() / H;
  TORCH_CHECK(y.size(-1) == H && res.sizes() == y.sizes(), "residual and y must be [T, H] with H = w's size");
  auto out = at::empty_like(res);
  const auto w1 = one_plus(w);
  const float *rp = res.data_ptr<float>(), *yp = y.data_ptr<float>(), *wp = w1.data();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, GRAIN, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const float *yr = yp + t * H, *rr = rp + t * H;
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
  for (auto [t, n] : {std::pair{&qkv, "qkv"}, {&qw, "q_norm"}, {&kw, "k_norm"}, {&cos, "cos"}, {&sin, "sin"}})
    check_fp32(*t, n);
  const int64_t D = qw.numel(), T = qkv.size(0), width = (nq + 2 * nkv) * D;
  TORCH_CHECK(D % 2 == 0 && kw.numel() == D, "q_norm and k_norm must have the (even) head dim");
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == width, "qkv must be [T, (nq + 2 nkv) * head_dim]");
  TORCH_CHECK(cos.numel() == T * D && sin.numel() == T * D, "cos and sin must be [T, head_dim]");
  auto q = at::empty({T, nq, D}, qkv.options());
  auto k = at::empty({T, nkv, D}, qkv.options());
  const auto qw1 = one_plus(qw), kw1 = one_plus(kw);
  const float *xp = qkv.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, T, GRAIN, [&](int64_t lo, int64_t hi) {
    std::vector<float> scratch(D);
    for (int64_t t = lo; t < hi; ++t) {
      const float *row = xp + t * width, *c = cp + t * D, *s = sp + t * D;
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
// gives g.
constexpr float kBeta = static_cast<float>(M_SQRT2 * M_2_SQRTPI * 0.5);
constexpr float kKappa = 0.044715f;

inline void gelu_mul_row(const float* g, const float* u, float* out, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 beta = _mm512_set1_ps(kBeta), kappa = _mm512_set1_ps(kKappa), minus_two = _mm512_set1_ps(-2.f),
               one = _mm512_set1_ps(1.f);
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(g + i);
    const __m512 cube = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
    const __m512 inner = _mm512_mul_ps(beta, _mm512_add_ps(x, _mm512_mul_ps(kappa, cube)));
    const __m512 act = _mm512_div_ps(x, _mm512_add_ps(one, Sleef_expf16_u10(_mm512_mul_ps(minus_two, inner))));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(act, _mm512_loadu_ps(u + i)));
  }
#elif defined(__AVX2__)
  const __m256 beta = _mm256_set1_ps(kBeta), kappa = _mm256_set1_ps(kKappa), minus_two = _mm256_set1_ps(-2.f),
               one = _mm256_set1_ps(1.f);
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(g + i);
    const __m256 cube = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
    const __m256 inner = _mm256_mul_ps(beta, _mm256_add_ps(x, _mm256_mul_ps(kappa, cube)));
    const __m256 act = _mm256_div_ps(x, _mm256_add_ps(one, Sleef_expf8_u10(_mm256_mul_ps(minus_two, inner))));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(act, _mm256_loadu_ps(u + i)));
  }
#endif
  for (; i < n; ++i) {
    const float x = g[i];
    out[i] = x / (1.f + std::exp(-2.f * (kBeta * (x + kKappa * (x * x * x))))) * u[i];
  }
}

at::Tensor gelu_mul(const at::Tensor& gate_up) {
  check_fp32(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "gate_up must be [T, 2 * intermediate]");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  auto out = at::empty({T, I}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // Split by rows, or by column blocks when there are few rows (a decode step of a handful of sequences).
  constexpr int64_t COLS = 512;
  const int64_t blocks = (I + COLS - 1) / COLS;
  at::parallel_for(0, T * blocks, 4, [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) {
      const int64_t t = j / blocks, c0 = (j % blocks) * COLS, n = std::min(COLS, I - c0);
      gelu_mul_row(gp + t * 2 * I + c0, gp + t * 2 * I + I + c0, op + t * I + c0, n);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(g3serve, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
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
