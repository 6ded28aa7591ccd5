#!/bin/sh
# The prepared GPU run of issue 19 (bench/gpu.py), in two steps:
#   here, once:            scripts/gpu-run.sh prep     (../shared/tools/device-prep.sh: wheels, tokenizer, data into
#                                                       .device/; then scripts/device-requirements.txt's wheels)
#   on the device machine: scripts/gpu-run.sh run      (the device tool's `run`, with carry [".device"])
# It installs the carried wheels, builds the Qwen2.5-0.5B-shape model there, and writes the results
# under $OUT after every phase (BUDGET_S caps the phases, default 450 s; NOTE says what the run is of).
set -eu
cd "$(dirname "$0")/.."
case "${1:-}" in
  prep)
    ../shared/tools/device-prep.sh
    # The device's Python is 3.12 (KINDS.md); the same platforms device-prep.sh asks for.
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .device/wheels -r scripts/device-requirements.txt
    ls .device/wheels ;;
  run)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/wheels/*.whl
    export PYTHONPATH="/tmp/site:$PWD/worker:$PWD"
    export QAIO_BENCH_DATA="$PWD/.device/shared/data/waimai_10k.csv"
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv || true
    python3 -m qaio_models.demo --shape qwen2.5-0.5b --out /tmp/m05 --tokenizer .device/shared/models/qwen-tokenizer
    python3 -m bench.gpu --model /tmp/m05 --out "${OUT:-/tmp/gpu-out}" --budget-s "${BUDGET_S:-450}" \
      --note "${NOTE:-}" ${ARGS:-} ;;
  *)
    echo "usage: $0 prep|run" >&2; exit 2 ;;
esac
