#!/usr/bin/env bash
# GPU check (issue 14, item 8): every test marked `gpu` and every benchmark on CUDA, then one table,
# within 8 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh                        # on a machine with CUDA
#   GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh   # dry run on the CPU: the gpu tests (they skip) and a
#                                                       # few benchmarks at tiny settings (checks the script,
#                                                       # measures nothing)
#
# Each check runs under its own time budget (they add up to about 7.3 minutes; the whole run also stops
# at GPU_CHECK_BUDGET_S, default 470 s) and writes its output to $GPU_CHECK_LOGS/<check>.log (a new
# temporary folder by default). The table gives each check's device, status (ok, FAIL rc, TIMEOUT),
# seconds and the last line of its output; the benchmarks' own tables follow it. A benchmark without a
# --device option runs on the CPU and says so in the table (pinet.py today). Options are passed only when
# the benchmark's source declares them, so a renamed option drops out instead of failing the run.
# Exit status: 0 when every check passed, 1 otherwise, 2 without CUDA (and no dry run asked for).
set -u -o pipefail
cd "$(dirname "$0")/.."

DEVICE=${GPU_CHECK_DEVICE:-cuda}
LOGS=${GPU_CHECK_LOGS:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
DEADLINE=$(($(date +%s) + ${GPU_CHECK_BUDGET_S:-470}))
mkdir -p "$LOGS"
export MPLBACKEND=Agg PYTHONUNBUFFERED=1

case "$DEVICE" in
cuda)
    if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: no CUDA device here, nothing checked. Run it on a GPU machine, or set" \
             "GPU_CHECK_DEVICE=cpu for a dry run of the commands on the CPU (not a GPU check)." >&2
        exit 2
    fi
    python -c "import torch; p = torch.cuda.get_device_properties(0); print(f'gpu_check: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}')" ;;
cpu) echo "gpu_check: DRY RUN on the CPU with tiny settings: the tests marked gpu skip, the numbers mean nothing." ;;
*) echo "gpu_check: GPU_CHECK_DEVICE=$DEVICE; expected cuda or cpu." >&2; exit 2 ;;
esac

# opt SCRIPT FLAG [VALUE...]: "FLAG VALUE..." when SCRIPT declares FLAG, else nothing.
opt() {
    local script=$1; shift
    if grep -q -- "\"$1\"" "$script"; then echo "$@"; fi
}

ROWS=()
FAILED=0
# check NAME BUDGET_S DEVICE_USED COMMAND...: run under min(budget, time left), log, record one row.
check() {
    local name=$1 budget=$2 used=$3; shift 3
    local left=$((DEADLINE - $(date +%s) - 3)) status rc start seconds last
    if [ "$left" -lt "$budget" ]; then budget=$left; fi
    if [ "$budget" -le 5 ]; then
        ROWS+=("$name|$used|NOT RUN (8-minute budget spent)|0|")
        FAILED=1
        return
    fi
    echo "gpu_check: $name (up to ${budget} s): $*" >&2
    start=$(date +%s)
    timeout --kill-after=10 "$budget" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    seconds=$(($(date +%s) - start))
    case $rc in
    0) status=ok ;;
    124 | 137) status=TIMEOUT; FAILED=1 ;;
    *) status="FAIL rc $rc"; FAILED=1 ;;
    esac
    last=$(grep -v '^\s*$' "$LOGS/$name.log" | tail -n 1 | cut -c1-70 | tr '|' '/')
    ROWS+=("$name|$used|$status|$seconds|$last")
}

# device_of SCRIPT: the device a benchmark runs on (the CPU when it has no --device option).
device_of() {
    if grep -q -- '"--device"' "$1"; then echo "$DEVICE"; else echo "cpu (no --device)"; fi
}

B=benchmarks
if [ "$DEVICE" = cuda ]; then
    check tests_gpu 150 cuda python -m pytest -m gpu -q -rs -p no:cacheprovider
    check fast_path 40 cuda python $B/fast_path.py --device cuda --batch 128 --no-compile
    check fast_path_compile 60 cuda python $B/fast_path.py --device cuda --batch 128 --methods classifier
    check superposition 50 "$(device_of $B/superposition.py)" python $B/superposition.py \
        $(opt $B/superposition.py --device cuda) $(opt $B/superposition.py --threads 1) $(opt $B/superposition.py --rounds 3)
    check mixmo 30 "$(device_of $B/mixmo.py)" python $B/mixmo.py $(opt $B/mixmo.py --device cuda) $(opt $B/mixmo.py --rounds 5)
    check subspaces 45 "$(device_of $B/subspaces.py)" python $B/subspaces.py $(opt $B/subspaces.py --device cuda) \
        $(opt $B/subspaces.py --rounds 3) $(opt $B/subspaces.py --sweep-rounds 2) $(opt $B/subspaces.py --train-batches 4)
    check probe 35 "$(device_of $B/probe.py)" python $B/probe.py $(opt $B/probe.py --device cuda) \
        $(opt $B/probe.py --batches 8) $(opt $B/probe.py --rounds 2) $(opt $B/probe.py --pairs 10)
    check pinet 25 "$(device_of $B/pinet.py)" python $B/pinet.py $(opt $B/pinet.py --device cuda) \
        $(opt $B/pinet.py --rows 1e3 1e4 1e5) $(opt $B/pinet.py --steps 2)
else  # dry run: the same scripts at the smallest settings they take
    check tests_gpu 60 cpu python -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_gpu.py
    check fast_path 60 cpu python $B/fast_path.py --depth 10 --width 1 --batch 8 --size 16 --rounds 1 --steps 1 \
        --warmup 1 --methods classifier superposition --no-compile
    check superposition 60 "$(device_of $B/superposition.py)" python $B/superposition.py $(opt $B/superposition.py --device cpu) \
        $(opt $B/superposition.py --depths 10) $(opt $B/superposition.py --width 1) $(opt $B/superposition.py --threads 1) \
        $(opt $B/superposition.py --rounds 1) $(opt $B/superposition.py --steps 1) $(opt $B/superposition.py --tables train)
    check mixmo 60 "$(device_of $B/mixmo.py)" python $B/mixmo.py $(opt $B/mixmo.py --device cpu) $(opt $B/mixmo.py --depth 10) \
        $(opt $B/mixmo.py --width 1) $(opt $B/mixmo.py --batch 8) $(opt $B/mixmo.py --reps 2) $(opt $B/mixmo.py --rounds 1)
    check pinet 60 "$(device_of $B/pinet.py)" python $B/pinet.py $(opt $B/pinet.py --rows 1e3) $(opt $B/pinet.py --steps 1)
fi

printf '\n%-18s %-18s %-12s %7s  %s\n' check device status seconds "last line of output"
for row in "${ROWS[@]}"; do
    IFS='|' read -r name used status seconds last <<<"$row"
    printf '%-18s %-18s %-12s %7s  %s\n' "$name" "$used" "$status" "$seconds" "$last"
done
echo "logs: $LOGS"
for row in "${ROWS[@]}"; do
    name=${row%%|*}
    [ "$name" = tests_gpu ] && continue
    [ -s "$LOGS/$name.log" ] || continue
    printf '\n== %s ==\n' "$name"
    grep -v -E 'Warning|warn\(|^\s*$' "$LOGS/$name.log" | tail -n 40
done
exit $FAILED
