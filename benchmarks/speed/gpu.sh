#!/usr/bin/env bash
# The speed benchmark on a CUDA machine (the `device` tool's GPU machines: Python 3.12 with a CUDA
# torch, no network). Two steps:
#
#   bash benchmarks/speed/gpu.sh prepare   # HERE (with network): wheels + the learn2learn sdist in .whl/
#   bash benchmarks/speed/gpu.sh run       # THERE: install them under /tmp/site, run bench.py --device cuda
#
# With the device tool:  run(command="bash benchmarks/speed/gpu.sh run", carry=[".whl"], timeout_s=540)
# The results (speed_cuda.json/.md) land in benchmarks/results/ there and are copied to $OUT.
# `.whl/` must be ignored by git (prepare adds it to .git/info/exclude).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
case "${1:-}" in
prepare)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    mkdir -p .whl
    PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLAT[@]}" -d .whl torchopt==0.7.3 optree
    python3 -m pip download -q --no-deps --only-binary=:all: -d .whl higher==0.2.1
    python3 -m pip download -q --no-deps --no-binary :all: -d .whl learn2learn==0.2.0
    ls -la .whl
    ;;
run)
    OUT="${OUT:-$ROOT/benchmarks/results}"
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    # learn2learn: regenerate its C files with the Cython there (see make_env.sh), build, install.
    SRC="$(mktemp -d)"
    tar xzf .whl/learn2learn-0.2.0.tar.gz -C "$SRC"
    (
        cd "$SRC/learn2learn-0.2.0"
        rm -rf .eggs learn2learn/data/meta_dataset.c learn2learn/data/task_dataset.c learn2learn/data/transforms.c
        python3 -m cython -3 learn2learn/data/meta_dataset.pyx learn2learn/data/task_dataset.pyx \
            learn2learn/data/transforms.pyx
        python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .
    ) || echo "learn2learn did not build there; bench.py runs without it and says so" >&2
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    export PYTHONUNBUFFERED=1
    # Shorter than the CPU run: 2 rounds x 10 iterations; no sweeps (one short device lease).
    python3 benchmarks/speed/bench.py --device cuda --threads 2 --rounds 2 --iters 10 --warmup 2 \
        --tag speed_cuda 2>&1 | grep -v Warning | tee "$OUT/speed_cuda.log"
    cp benchmarks/results/speed_cuda.json benchmarks/results/speed_cuda.md "$OUT/" 2>/dev/null || true
    ;;
*)
    echo "usage: bash benchmarks/speed/gpu.sh prepare|run" >&2
    exit 2
    ;;
esac
