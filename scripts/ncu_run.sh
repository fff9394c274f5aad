#!/usr/bin/env bash
# Nsight Compute profiles of the sm90 flash-attention kernels (GPU machine only): text exports
# of the details and per-SASS-instruction source pages under $OUT. Usage: bash scripts/ncu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-ncu-out}"; mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/kpt-site .whl/sqlite*.whl .whl/click*.whl
export PYTHONPATH="/tmp/kpt-site:$PWD" KPT_CACHE_DIR="$PWD/.cache/kpt"
python3 -c "from kpt.ops.flash_attention import _sm90; _sm90.SPEC.load()" || exit 1
# KPT_NCU_CASES: see scripts/ncu_sm90.py; KPT_NCU_VARIANT: the forward variant (file names
# carry it).
for c in ${KPT_NCU_CASES:-bwd bwdc fwd fwdc}; do
    case $c in bwd*) kname='attention_bwd<' ;; *) kname='attention_fwd_overlap<' ;; esac
    f="$c-${KPT_NCU_VARIANT:-overlap}"
    timeout -s INT 200 ncu --clock-control none --kernel-name-base demangled -k "regex:$kname" \
        --launch-skip 1 --launch-count 1 --set full --import-source no -f -o "/tmp/$f" \
        python3 scripts/ncu_sm90.py "$c" > "$out/$f.log" 2>&1
    tail -3 "$out/$f.log"
    ncu -i "/tmp/$f.ncu-rep" --page details --csv > "$out/$f.details.csv" 2>&1
    ncu -i "/tmp/$f.ncu-rep" --page source --csv --print-source sass > "$out/$f.sass.csv" 2>&1
    ls -la "$out/$f".*
done
