#!/usr/bin/env bash
# The 5-way few-shot rows of issue 15 (item 5): miniImageNet and CIFAR-FS, 1 and 5 shots, for MAML
# (conv-4, 32 filters), ProtoNets (ResNet-12) and MetaOptNet-SVM (ResNet-12): configs/<row>.toml, each
# trained for $FEWSHOT_MINUTES minutes of meta-training (resumable), tested on 600 fixed tasks, written
# with the published numbers beside them to $OUT/fewshot_rows.{json,md} (and $OUT/fewshot_rows.log).
# It runs only the rows whose data it finds, and says which data it found; nothing is downloaded.
#
# Data ($INNERLOOP_DATA, else shared/data or ../shared/data, else the carried .cache/fewshot-data):
#   miniimagenet/images/<filename>   the user's miniImageNet images (ImageNet licence; flat or by class)
#   miniimagenet/splits/ravi/{train,val,test}.csv
#   cifar100/cifar-100-binary.tar.gz (or cifar-100-binary/, or the Python version)
# ../shared/data holds only the Ravi CSVs, so here no row has its data. Neither data set fits the device
# tool's 64 MiB carry: CIFAR-100's binary archive is 168 MB and its preprocessed 32 px cache
# ($INNERLOOP_CACHE, innerloop/data/images.py) about 184 MB; miniImageNet's images, or their 84 px
# cache (about 1.3 GB), far more. So the real rows run on a GPU machine that has the data:
#   INNERLOOP_DATA=/path/to/data FEWSHOT_MINUTES=30 OUT=results/fewshot bash benchmarks/gpu/fewshot_rows.sh
#   (FEWSHOT_ROWS="miniimagenet_maml_conv4_5w1s cifarfs_metaoptnet_resnet12_5w5s" picks rows; a second
#    invocation resumes every row from runs/fewshot_rows/<row>/last.pt and trains it further)
# The first run of a data set decodes and caches its images once (timed apart as data_prep_s); set
# INNERLOOP_CACHE to a fast disk. With the device tool, only the synthetic dry run is possible (a CUDA
# check of the script, about a minute of device time):
#   run(command="DEVICE=cuda bash benchmarks/gpu/fewshot_rows.sh --dry-run", timeout_s=300)
# `prepare` says what it found and packs into .cache/fewshot-data whatever data set fits the carry
# (carry=[".cache/fewshot-data"]); today it finds none that does.
# Here, a check of the script itself on the CPU (every row on synthetic data), in about a minute:
#   DEVICE=cpu PYTHON=.venv/bin/python bash benchmarks/gpu/fewshot_rows.sh --dry-run
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
MINUTES="${FEWSHOT_MINUTES:-30}"
CARRY_MIB="${FEWSHOT_CARRY_MIB:-60}"
DRY=0
find_data() {
    if [ -n "${INNERLOOP_DATA:-}" ]; then echo "$INNERLOOP_DATA"; return; fi
    for d in "$ROOT/shared/data" "$ROOT/../shared/data" "$ROOT/.cache/fewshot-data"; do
        if [ -d "$d" ]; then echo "$d"; return; fi
    done
}
case "${1:-}" in
prepare)
    SRC="$(find_data)"
    [ -n "$SRC" ] || { echo "no data folder: set INNERLOOP_DATA" >&2; exit 1; }
    DEST=.cache/fewshot-data  # .cache/ is ignored by git: it travels only when carried
    packed=0
    mib() { du -sm "$@" 2>/dev/null | awk '{s += $1} END {print s + 0}'; }
    if [ -d "$SRC/miniimagenet/images" ] && [ -d "$SRC/miniimagenet/splits/ravi" ]; then
        size=$(mib "$SRC/miniimagenet")
        if [ "$size" -le "$CARRY_MIB" ]; then
            mkdir -p "$DEST" && cp -r "$SRC/miniimagenet" "$DEST/" && packed=1
            echo "miniimagenet: packed ($size MiB)"
        else
            echo "miniimagenet: found ($size MiB), more than the $CARRY_MIB MiB carry: run on a machine with the data"
        fi
    else
        echo "miniimagenet: absent (needs $SRC/miniimagenet/images and $SRC/miniimagenet/splits/ravi/*.csv)"
    fi
    if ls "$SRC"/cifar100/cifar-100-* >/dev/null 2>&1; then
        size=$(mib "$SRC"/cifar100/cifar-100-*)
        if [ "$size" -le "$CARRY_MIB" ]; then
            mkdir -p "$DEST/cifar100" && cp -r "$SRC"/cifar100/cifar-100-* "$DEST/cifar100/" && packed=1
            echo "cifar100: packed ($size MiB)"
        else
            echo "cifar100: found ($size MiB), more than the $CARRY_MIB MiB carry: run on a machine with the data"
        fi
    else
        echo "cifar100: absent (needs $SRC/cifar100/cifar-100-binary.tar.gz or an extracted/Python version)"
    fi
    if [ "$packed" = 1 ]; then du -sh "$DEST"; else echo "nothing packed: no data set here fits the carry"; fi
    exit 0
    ;;
--dry-run) DRY=1 ;;
"") ;;
*) echo "usage: bash benchmarks/gpu/fewshot_rows.sh [prepare|--dry-run]" >&2; exit 2 ;;
esac
if [ "$DRY" = 1 ]; then OUT="${OUT:-$(mktemp -d)}"; else OUT="${OUT:-$ROOT/benchmarks/results/fewshot}"; fi
mkdir -p "$OUT"
LOG="$OUT/fewshot_rows.log"
: > "$LOG"
say() { echo "$@" | tee -a "$LOG"; }
DATA="$(find_data)"
if [ "$DRY" = 0 ] && [ -n "$DATA" ]; then export INNERLOOP_DATA="$DATA"; fi
NOTE=""; [ "$DRY" = 1 ] && NOTE=" (not used: the dry run makes synthetic stand-ins)"
say "data folder: ${DATA:-none found}$NOTE"

# innerloop from this tree; its version comes from package metadata, so give it some when it is not installed.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import importlib.metadata as m; m.version('innerloop')" 2>/dev/null; then
    SITE="$(mktemp -d)"
    VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)"
    mkdir -p "$SITE/innerloop-$VERSION.dist-info"
    printf 'Metadata-Version: 2.1\nName: innerloop\nVersion: %s\n' "$VERSION" > "$SITE/innerloop-$VERSION.dist-info/METADATA"
    export PYTHONPATH="$PYTHONPATH:$SITE"
fi
"$PY" -c "import platform, torch; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', \
torch.version.cuda, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')" 2>&1 | tee -a "$LOG"
if [ "$DEVICE" != "cpu" ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    say "DEVICE=$DEVICE but torch sees no CUDA device here; stopping."
    exit 1
fi
export PYTHONUNBUFFERED=1
ROWS=()
if [ -n "${FEWSHOT_ROWS:-}" ]; then read -r -a ROWS <<< "$FEWSHOT_ROWS"; ROWS=(--rows "${ROWS[@]}"); fi
if [ "$DRY" = 1 ]; then
    ARGS=(--dry-run); LIMIT=170
else
    ARGS=(--minutes "$MINUTES")
    # the driver keeps each row to its budget; this outer limit only stops a hung run: 12 rows of
    # budget plus ${FEWSHOT_SLACK_S:-600} s each for data preparation, validation and the 600 test tasks
    LIMIT=$(awk -v m="$MINUTES" -v s="${FEWSHOT_SLACK_S:-600}" 'BEGIN {printf "%d", 12 * (m * 60 + s)}')
fi
if [ "$DRY" = 1 ]; then say "== few-shot rows on $DEVICE (dry run: synthetic data, 2 iterations a row)"
else say "== few-shot rows on $DEVICE ($MINUTES min of meta-training per row)"; fi
timeout "$LIMIT" "$PY" benchmarks/gpu/fewshot_rows.py --out "$OUT" --device "$DEVICE" "${ARGS[@]}" ${ROWS[@]+"${ROWS[@]}"} 2>&1 \
    | grep -v -e Warning -e "warnings.warn" | tee -a "$LOG"
status=${PIPESTATUS[0]}
[ "$status" = 0 ] || say "the few-shot rows failed or timed out (exit $status); finished rows are in $OUT"
ls -la "$OUT" | tee -a "$LOG"
exit "$status"
