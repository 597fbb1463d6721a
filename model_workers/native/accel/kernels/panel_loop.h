// The skinny GEMM kernels' shared loop (skinny_linear.cpp, skinny_bf16.cpp, int8_ranking.cpp): the weight packed in
// panels of outputs, each panel meeting the rows in register blocks. One header, part of the build key.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace g3serve_panels {

// The row count of the last block is a runtime value: call f with it as a template constant (1..R).
template <int R, class F>
inline void with_rows(int64_t rows, F&& f) {
  if constexpr (R > 0) {
    if (rows == R) return f(std::integral_constant<int, R>{});
    with_rows<R - 1>(rows, f);
  }
}

// f(p, b, blocks, rows) for every panel p and every block b of MR rows (of `blocks`; the last may hold fewer, passed
// as a compile-time `rows`). Threads take contiguous runs of panels: one sequential weight stream each.
template <int MR, class F>
inline void for_panel_blocks(int64_t panels, int64_t M, F&& f) {
  const int64_t blocks = (M + MR - 1) / MR;
  at::parallel_for(0, panels, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p)
      for (int64_t b = 0; b < blocks; ++b)
        with_rows<MR>(std::min<int64_t>(MR, M - b * MR), [&](auto rows) { f(p, b, blocks, rows); });
  });
}

}  // namespace g3serve_panels
