#!/usr/bin/env bash
# Everything kpt checks on a GPU machine, in one go: carried wheels, kpt.info, the whole test
# suite with CUDA present, an autotune warm-up on Llama-3-8B shapes, then the benchmarks, with
# their summary table printed last. Logs go to $OUT (or ./gpu-out) when set.
# Usage: bash scripts/gpu.sh [quick]     ("quick": skip the autotune warm-up)
# KPT_GPU_TESTS / KPT_GPU_BENCH: test paths and benchmark files to run (default: all; "none"
# skips). KPT_GPU_HOST=1: the host time per eager call first (scripts/host_latency.py). KPT_GPU_TUNE: "op=shapes.json ..." pairs to tune instead of the Llama-3-8B warm-up.
# Compiled kernels (kpt's JIT builds, Triton's cache) persist in .cache/ when it is carried in
# and are copied back under $OUT/cache, so the next machine need not rebuild them.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 KPT_AUTOTUNE_DB="$out/autotune.db"
export KPT_CACHE_DIR="$PWD/.cache/kpt" TRITON_CACHE_DIR="$PWD/.cache/triton"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/kpt-site .whl/*.whl \
        && export PYTHONPATH="/tmp/kpt-site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
python3 -m kpt.info
status=0
if [ "${KPT_GPU_HOST:-0}" = "1" ]; then
    python3 scripts/host_latency.py 2>&1 | tee "$out/host.log" | tail -40
fi
if [ "${KPT_GPU_TESTS:-}" != "none" ]; then
    # shellcheck disable=SC2086
    python3 -m pytest -q -p no:cacheprovider ${KPT_GPU_TESTS:-tests} 2>&1 \
        | tee "$out/tests.log" | tail -25
    status=${PIPESTATUS[0]}
fi
if [ -n "${KPT_GPU_TUNE:-}" ]; then
    for pair in $KPT_GPU_TUNE; do
        python3 -m kpt.autotune.cli warmup -q --op "${pair%%=*}" --shapes "${pair#*=}" 2>&1 \
            | tee -a "$out/autotune.log" | tail -12
    done
    python3 -m kpt.autotune.cli show --all > "$out/autotune-rows.txt" 2>&1
elif [ "${1:-}" != "quick" ]; then
    python3 -m kpt.autotune.cli warmup --model bench/llama3-8b-config.json --tokens 1,16,128,4096 \
        2>&1 | tee "$out/autotune.log" | tail -20
    python3 -m kpt.autotune.cli show --all > "$out/autotune-rows.txt" 2>&1
    python3 -m kpt.autotune.cli export "$out/tuned.jsonl" 2>&1 | tail -2
    # This GPU's rows as kpt ships them: copy $out/<gpu>.jsonl into kpt/autotune/tuned/.
    python3 -m kpt.autotune.cli export --ship "$out" 2>&1 | tail -2
fi
if [ "${KPT_GPU_BENCH:-}" != "none" ]; then
    # shellcheck disable=SC2086
    python3 -m pytest -q -p no:cacheprovider ${KPT_GPU_BENCH:-bench/bench_*.py} \
        --benchmark-json="$out/bench.json" --benchmark-disable-gc 2>&1 | tee "$out/bench.log" \
        | sed -n '/kpt benchmark summary/,$p'
fi
if [ -n "${OUT:-}" ] && [ -d .cache ]; then
    for part in kpt triton; do
        [ -d ".cache/$part" ] && tar -czf "$out/cache-$part.tgz" ".cache/$part"
    done
    ls -la "$out"/cache-*.tgz
fi
echo "tests exit status: $status"
exit "$status"
