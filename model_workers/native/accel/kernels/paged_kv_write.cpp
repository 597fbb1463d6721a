// A step's new K/V rows into their paged-cache slots, as a torch custom op (g3serve::write_kv), in the cache's dtype:
// fp32, or bf16 rounded to nearest even (the rounding of torch's own cast, c10::BFloat16).
//
// Why: the torch path is two casts and two index_copy_ per layer, each a dispatch and a fresh tensor for a few rows
// (a decode step's 32); here both tensors go in one call, converted on the way.
//
//   k, v      [T, Hkv, D] fp32 or bf16; each row's Hkv x D values contiguous, any row stride (v is a view into the
//             layer's fused qkv projection)
//   k_cache   [N, P, Hkv, D] fp32 or bf16, contiguous; v_cache likewise, the same dtype
//   slots     [T] int64: row t goes to position slots[t] of the cache's N * P positions
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "simd_widen.h"  // from_float / to_float

namespace {

// One row of `width` values, converted: a plain copy within a dtype, else simd_widen.h's row conversions (bf16
// widened exactly; fp32 rounded to nearest even as c10::BFloat16 does).
template <typename S, typename C>
inline void copy_row(const S* from, C* to, int64_t width) {
  if constexpr (std::is_same_v<S, C>)
    std::memcpy(to, from, width * sizeof(C));
  else if constexpr (std::is_same_v<C, at::BFloat16>)
    g3serve_simd::from_float(from, to, width);
  else
    g3serve_simd::to_float(from, to, width);
}

template <typename S, typename C>
void copy_rows(const at::Tensor& src, at::Tensor& cache, const int64_t* slots, int64_t T, int64_t width) {
  const S* s = src.data_ptr<S>();
  C* c = cache.data_ptr<C>();
  const int64_t stride = src.stride(0);
  for (int64_t t = 0; t < T; ++t) copy_row(s + t * stride, c + slots[t] * width, width);
}

template <typename S>
void write_one(const at::Tensor& src, at::Tensor& cache, const int64_t* slots, int64_t T, int64_t width) {
  if (cache.scalar_type() == at::kBFloat16)
    copy_rows<S, at::BFloat16>(src, cache, slots, T, width);
  else
    copy_rows<S, float>(src, cache, slots, T, width);
}

void write_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor k_cache, at::Tensor v_cache,
              const at::Tensor& slots) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
                  v_cache.is_contiguous() && v_cache.scalar_type() == k_cache.scalar_type(),
              "k_cache and v_cache must be contiguous [N, P, Hkv, D] of one dtype");
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kBFloat16,
              "the KV cache must be fp32 or bf16");
  const int64_t T = slots.size(0), positions = k_cache.size(0) * k_cache.size(1);
  const int64_t width = k_cache.size(2) * k_cache.size(3);
  TORCH_CHECK(slots.dim() == 1 && slots.scalar_type() == at::kLong && slots.is_contiguous(), "slots: int64 [T]");
  for (const at::Tensor* x : {&k, &v}) {
    TORCH_CHECK(x->dim() == 3 && x->size(0) == T && x->size(1) == k_cache.size(2) && x->size(2) == k_cache.size(3),
                "k and v must be [T, Hkv, D] of the cache's heads");
    TORCH_CHECK(x->stride(2) == 1 && x->stride(1) == x->size(2), "each row of k and v must be contiguous");
    TORCH_CHECK(x->scalar_type() == at::kFloat || x->scalar_type() == at::kBFloat16, "k and v must be fp32 or bf16");
  }
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(sl[t] >= 0 && sl[t] < positions, "slot outside the cache");
  for (auto [x, cache] : {std::pair<const at::Tensor*, at::Tensor*>{&k, &k_cache}, {&v, &v_cache}}) {
    if (x->scalar_type() == at::kBFloat16)
      write_one<at::BFloat16>(*x, *cache, sl, T, width);
    else
      write_one<float>(*x, *cache, sl, T, width);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(g3serve, m) {
  m.def("write_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots) -> ()");
}

TORCH_LIBRARY_IMPL(g3serve, CPU, m) { m.impl("write_kv", &write_kv); }
