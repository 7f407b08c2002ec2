#!/usr/bin/env bash
# The GPU checks of issue 12 ("any model, any device"), run ONCE on a lent CUDA machine (one H200, 16
# cores, no network, only this repository copied). Four parts, each under `timeout`, about 8 minutes
# in all; everything lands in $OUT (at most 8 files):
#
#   1. device_check.json  a short sinusoid meta-training + checkpoint + resume + meta-test in fp32 (vmap
#                         and loop), bf16 and fp16 under tests/training/devicecheck.py's checker: every
#                         tensor on the GPU (violations listed), the fp16 loss scale, the GPU's
#                         checkpoint evaluated on the CPU
#   2. omniglot_cuda.json Omniglot MAML 5-way 1-shot (configs/omniglot_maml_5w1s.toml) for a training
#                         budget of $OMNIGLOT_BUDGET_S seconds: accuracy on 600 test tasks, wall times
#   3. speed_gpu.json/.md benchmarks/speed/bench.py --device cuda: innerloop (fp32, bf16) against
#                         learn2learn / higher / torchopt where installed (none is fetched: a missing one
#                         is skipped and named; carry wheels in .whl/, see benchmarks/speed/gpu.sh prepare)
#   4. precision_cuda.json/.md  benchmarks/precision.py: the meta-gradient's error against float64 for
#                         fp32, bf16 and fp16 (loss-scaled) on the GPU
#   and run.log           what the four printed, with the machine and the missing libraries
#
# Here, first (copies Omniglot where `carry` can take it: shared/ is not part of this checkout):
#   bash benchmarks/gpu/run.sh prepare
# There, with the device tool:
#   run(command="bash benchmarks/gpu/run.sh", carry=[".cache/gpu-data"], timeout_s=540)
#   (add ".whl" to carry when benchmarks/speed/gpu.sh prepare has fetched the other libraries' wheels)
# Here, a check of the script itself on the CPU, in under a minute:
#   DEVICE=cpu PYTHON=.venv/bin/python bash benchmarks/gpu/run.sh --dry-run
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
OMNIGLOT_BUDGET_S="${OMNIGLOT_BUDGET_S:-150}"
DRY=0
case "${1:-}" in
prepare)
    SRC="${INNERLOOP_DATA:-$ROOT/../shared/data}/omniglot"
    mkdir -p .cache/gpu-data
    cp -r "$SRC" .cache/gpu-data/  # .cache/ is ignored by git: it travels only when carried
    du -sh .cache/gpu-data
    exit 0
    ;;
--dry-run) DRY=1 ;;
"") ;;
*) echo "usage: bash benchmarks/gpu/run.sh [prepare|--dry-run]" >&2; exit 2 ;;
esac
if [ "$DRY" = 1 ]; then OUT="${OUT:-$(mktemp -d)}"; else OUT="${OUT:-$ROOT/benchmarks/results/gpu}"; fi
mkdir -p "$OUT"
LOG="$OUT/run.log"
: > "$LOG"
say() { echo "$@" | tee -a "$LOG"; }

# Data: $INNERLOOP_DATA, else shared/data of the copy, else the carried .cache/gpu-data.
if [ -z "${INNERLOOP_DATA:-}" ]; then
    for d in "$ROOT/shared/data" "$ROOT/../shared/data" "$ROOT/.cache/gpu-data"; do
        if [ -d "$d/omniglot" ]; then export INNERLOOP_DATA="$d"; break; fi
    done
fi
say "data: ${INNERLOOP_DATA:-none found}"

# innerloop from this tree; its version comes from package metadata, so give it some when it is not installed.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import importlib.metadata as m; m.version('innerloop')" 2>/dev/null; then
    SITE="$(mktemp -d)"
    VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)"
    mkdir -p "$SITE/innerloop-$VERSION.dist-info"
    printf 'Metadata-Version: 2.1\nName: innerloop\nVersion: %s\n' "$VERSION" > "$SITE/innerloop-$VERSION.dist-info/METADATA"
    export PYTHONPATH="$PYTHONPATH:$SITE"
fi
# The other libraries of the speed benchmark, only from carried wheels (nothing is downloaded).
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site" || say "the carried wheels did not install"
fi
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for name in ("learn2learn", "higher", "torchopt"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name}: not installed, skipped by the speed benchmark")
EOF
if [ "$DEVICE" != "cpu" ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    say "DEVICE=$DEVICE but torch sees no CUDA device here; stopping."
    exit 1
fi
export PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then
    CHECK=(--iterations 4); OMNI=(--dry-run); TAG=speed_gpu_dryrun
    SPEED=(--settings sinusoid-2nd --impls innerloop --rounds 1 --iters 2 --warmup 1 --meta-batch 4)
    T1=60; T2=60; T3=90
else
    CHECK=(--iterations 10); OMNI=(--budget-s "$OMNIGLOT_BUDGET_S"); TAG=speed_gpu
    SPEED=(--settings omniglot-2nd sinusoid-2nd --impls innerloop innerloop-bf16 learn2learn higher torchopt
           --rounds 1 --iters 5 --warmup 2)
    T1=75; T2=$((OMNIGLOT_BUDGET_S + 90)); T3=170
fi
status=0
say "== 1. device check on $DEVICE"
timeout "$T1" "$PY" benchmarks/gpu/device_check.py --device "$DEVICE" --out "$OUT" "${CHECK[@]}" 2>&1 \
    | grep -v -e Warning -e "warnings.warn" | tee -a "$LOG" || { say "device check failed or timed out"; status=1; }
say "== 2. Omniglot MAML 5-way 1-shot on $DEVICE"
timeout "$T2" "$PY" benchmarks/gpu/omniglot_cuda.py --device "$DEVICE" --out "$OUT" "${OMNI[@]}" 2>&1 \
    | grep -v -e Warning -e "warnings.warn" | tee -a "$LOG" || { say "Omniglot run failed or timed out"; status=1; }
say "== 3. speed benchmark on $DEVICE"
timeout "$T3" "$PY" benchmarks/speed/bench.py --device "$DEVICE" --threads 4 --tag "$TAG" "${SPEED[@]}" 2>&1 \
    | grep -v -e Warning -e "warnings.warn" | tee -a "$LOG" || { say "speed benchmark failed or timed out"; status=1; }
cp "benchmarks/results/$TAG.json" "benchmarks/results/$TAG.md" "$OUT/" 2>/dev/null || say "no speed results"
say "== 4. meta-gradient error against float64 per precision on $DEVICE"
timeout 60 "$PY" benchmarks/precision.py --device "$DEVICE" --repeats 2 --threads 4 --out "$OUT" 2>&1 \
    | grep -v -e Warning -e "warnings.warn" | tee -a "$LOG" || { say "precision check failed or timed out"; status=1; }
if [ "$DRY" = 1 ]; then rm -f benchmarks/results/"$TAG"*; fi  # the dry run leaves the results folder as it was
ls -la "$OUT" | tee -a "$LOG"
exit $status
