#!/bin/sh
# llama.cpp's server and converter, for make bench's side-by-side (never for serving): built from the
# llama.cpp that llama-cpp-python's source distribution on PyPI vendors (no other source is reachable
# from every machine this runs on), for this machine's CPU (GGML_NATIVE), into PREFIX (build/llama.cpp):
#   PREFIX/bin/llama-server         the OpenAI-compatible server (parallel slots, continuous batching)
#   PREFIX/bin/llama-server-noamx   the same without its AMX matmul, on CPUs that report AMX (its AMX
#                                   path segfaulted on this project's Xeons, where oneDNN's runs: the
#                                   bench tries the first and falls back to this one when it dies)
#   PREFIX/src/convert_hf_to_gguf.py with its gguf-py beside it
# Does nothing when they are there. ~10 minutes on 2 cores.
#   scripts/build-llama-cpp.sh [PREFIX]
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
prefix=${1:-$here/build/llama.cpp}
version=0.3.36  # llama-cpp-python, whose vendor/llama.cpp is built
python=${PYTHON:-$here/.venv/bin/python}
amx=$(grep -qw amx_int8 /proc/cpuinfo && echo yes || echo no)
if [ -x "$prefix/bin/llama-server" ] && [ -f "$prefix/src/convert_hf_to_gguf.py" ] \
    && { [ "$amx" = no ] || [ -x "$prefix/bin/llama-server-noamx" ]; }; then
  exit 0
fi
command -v cmake >/dev/null 2>&1 && command -v c++ >/dev/null 2>&1 \
  || { echo "building llama.cpp needs cmake and a C++ compiler (apt-get install cmake g++)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work"
tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
echo "building llama.cpp's server (llama-cpp-python $version's) into $prefix" >&2
# build DIR [EXTRA_FLAGS]: llama-server for this CPU (GGML_NATIVE), with the compiler flags added
build() {
  cmake -S "$src" -B "$work/$1" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
    -DCMAKE_C_FLAGS="${2:-}" -DCMAKE_CXX_FLAGS="${2:-}" \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >"$work/$1.cmake.log" 2>&1 \
    || { tail -20 "$work/$1.cmake.log" >&2; exit 1; }
  cmake --build "$work/$1" --target llama-server -j "$(nproc)" >"$work/$1.build.log" 2>&1 \
    || { tail -30 "$work/$1.build.log" >&2; exit 1; }
}
mkdir -p "$prefix/bin" "$prefix/src"
build native
cp "$work/native/bin/llama-server" "$prefix/bin/"
if [ "$amx" = yes ]; then
  # Explicit -mno-* flags win over -march=native's, whatever their order: ggml's AMX code is left out.
  build noamx "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  cp "$work/noamx/bin/llama-server" "$prefix/bin/llama-server-noamx"
fi
cp -r "$src/convert_hf_to_gguf.py" "$src/gguf-py" "$prefix/src/"
[ ! -d "$src/conversion" ] || cp -r "$src/conversion" "$prefix/src/"
