#!/usr/bin/env bash
# Every GPU measurement in one command, most important first, each part under its own
# time limit so that one slow part cannot starve the others (about 10 minutes in all):
#   1. the CUDA tests (CUDA graph step == eager step, every Triton kernel against its reference),
#      in 4 processes where pytest-xdist is installed
#   2. bench/train_step.py: Swin-L 384 b8 and EVA02-L 512 b2, every mode, eager and graphed
#      (rewrites its section of docs/benchmarks.md after every mode; `--merge` an earlier run's
#      JSON to keep its rows)
#   3. bench/kernels.py (rewrites its section of docs/kernels.md): the fused Hybrid Adapter
#      (with its split by kernel; at the tile sizes `kernels.hybrid_adapter.tile_sizes`
#      chooses, and at fixed 16 x 64 and 32 x 64 tiles at every shape, which tell whether its
#      choice of 16 or 32 tokens is right), the partial conv, SimAM: device time, without the
#      torch.compile column (its compilations took most of the last run's time, which ended
#      before the partial conv)
#   4. bench/vs_timm.py: this repository's Swin-L and EVA02-L against timm's (when timm imports),
#      Swin-L also with the explicit window attention, EVA02-L also with the fast forward (last,
#      so the one cut if the part runs out of time); the kernels whose time differs most
# Logs, the JSON files and the rewritten docs/benchmarks.md and docs/kernels.md go to $OUT
# (default ./gpu_out): eight files, the most the device tool brings back (the machine's
# description heads tests.log).
# The end-to-end smoke of the three tasks' scripts at the paper's sizes does not fit beside these:
# it is a second call on the warm machine, with what is left of the device time as its deadline,
# `python bench/gpu_smoke.py --parallel --deadline 170 --report $OUT` (its docstring).
#
#   bash bench/gpu_session.sh            # on a machine with a CUDA GPU, from the repository root
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

part() {  # part SECONDS NAME COMMAND...: run one part under a time limit, log it, go on
    local limit=$1 name=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" >> "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "== $name: exit $rc"
    cp docs/benchmarks.md docs/kernels.md "$OUT/"  # as they stand: kept if the call is cut short
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/tests.log" 2>&1
cat "$OUT/tests.log"
PARALLEL=()
$PY -c "import xdist" 2>/dev/null && PARALLEL=(-n 4)
part 150 tests $PY -m pytest -q -rf --tb=short "${PARALLEL[@]}" tests/test_graph_step.py \
    tests/test_simam_paths.py tests/test_kernels.py tests/test_kernels_model.py \
    tests/test_hybrid_adapter_kernel.py
part 270 train_step $PY bench/train_step.py --json "$OUT/train_step.json"
part 100 kernels $PY bench/kernels.py --ops hybrid_adapter partial_conv simam --no-compile \
    --adapter-tiles 16:64 32:64
part 60 vs_timm $PY bench/vs_timm.py --json "$OUT/vs_timm.json"
