#!/usr/bin/env bash
# The package as a user gets it: build the sdist and the wheel, check them with twine, install the
# wheel (not the source tree, not editable) into a fresh venv, and run innerloop from there.
#
#   bash tools/check_package.sh          # or: make package-check
#
# PYTHON: the interpreter that builds (default .venv/bin/python; it needs `build` and `twine`, the
# dev venv has both). The fresh venv gets torch==2.13.0 first, pinned: an unpinned torch pulls a
# multi-GB CUDA build, while the pin resolves to the CPU wheel of pip's configured index. Everything
# happens in a temporary folder, removed at the end; the source tree is not written to.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
TORCH_PIN="${TORCH_PIN:-torch==2.13.0}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

if ! "$PYTHON" -c "import build, twine" 2>/dev/null; then
  echo "check_package: $PYTHON lacks 'build' or 'twine'; run 'make setup' (or set PYTHON=...)." >&2
  exit 2
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/innerloop-package.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
start=$SECONDS
step() { printf '\n== %s (%ds)\n' "$1" "$((SECONDS - start))"; }

step "build the sdist and the wheel"
# The source is copied first so that the build's egg-info and build/ folders land in $WORK.
mkdir "$WORK/src"
if git -C "$ROOT" rev-parse --is-inside-work-tree > /dev/null 2>&1; then
  # what git would commit: tracked files and new ones it does not ignore (a deleted file is skipped)
  # (a file deleted in the working tree but still in the index is skipped; any other copy error fails)
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard) \
    | (cd "$ROOT" && while IFS= read -r -d '' f; do
         if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi
       done | xargs -0 -r cp --parents -t "$WORK/src")
else  # not a git checkout (an unpacked sdist): what the build reads
  (cd "$ROOT" && cp -R --parents pyproject.toml README.md innerloop "$WORK/src")
  find "$WORK/src" -name __pycache__ -prune -exec rm -rf {} +
fi
"$PYTHON" -m build --outdir "$WORK/dist" "$WORK/src" > "$WORK/build.log" 2>&1 \
  || { cat "$WORK/build.log" >&2; echo "check_package: the build failed (log above)." >&2; exit 1; }
ls -l "$WORK/dist"

step "twine check --strict"
"$PYTHON" -m twine check --strict "$WORK"/dist/*

step "the wheel's contents"
WHEEL="$(ls "$WORK"/dist/innerloop-*.whl)"
"$PYTHON" - "$WORK/src" "$WHEEL" <<'EOF'
import sys, zipfile
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

root, wheel = Path(sys.argv[1]), Path(sys.argv[2])
version = tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
names = set(zipfile.ZipFile(wheel).namelist())
problems = []
if not wheel.name.startswith(f"innerloop-{version}-"):
    problems.append(f"the wheel {wheel.name} is not version {version} (pyproject.toml)")
want = {p.relative_to(root).as_posix() for p in (root / "innerloop").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
missing = sorted(want - names)
if missing:
    problems.append(f"files of innerloop/ missing from the wheel: {missing} (add them to "
                    "[tool.setuptools.package-data] in pyproject.toml)")
if "innerloop/py.typed" not in names:
    problems.append("innerloop/py.typed is not in the wheel")
stray = sorted(n for n in names if n.split("/")[0] not in ("innerloop", f"innerloop-{version}.dist-info"))
if stray:
    problems.append(f"files outside the package in the wheel: {stray}")
if problems:
    sys.exit("check_package: " + "; ".join(problems))
splits = sorted(n for n in names if n.startswith("innerloop/data/splits/"))
print(f"{wheel.name}: {len(names)} files, py.typed, {len(splits)} split files, version {version}")
EOF

step "a fresh venv (no system site packages): $TORCH_PIN, then the wheel"
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
pip_install() {
  "$VPY" -m pip install -q "$@" > "$WORK/pip.log" 2>&1 \
    || { cat "$WORK/pip.log" >&2; echo "check_package: pip install $* failed (log above)." >&2; exit 1; }
}
pip_install "$TORCH_PIN"
pip_install "$WHEEL"
"$VPY" -m pip list 2>/dev/null | grep -iE '^(innerloop|torch|numpy|pillow|matplotlib|tqdm) '

step "innerloop from the installed wheel (cwd outside the source tree)"
mkdir "$WORK/cwd"
cd "$WORK/cwd"
export PYTHONNOUSERSITE=1
unset PYTHONPATH
"$WORK/venv/bin/innerloop" --help > /dev/null
"$WORK/venv/bin/innerloop" train --help > /dev/null
"$VPY" - "$ROOT" "$WORK/venv" <<'EOF'
import importlib.metadata, sys
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (tomli: a dependency of innerloop there)
    import tomli as tomllib
from pathlib import Path

import innerloop

root, venv = Path(sys.argv[1]), Path(sys.argv[2]).resolve()
version = tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
where = Path(innerloop.__file__).resolve()
if venv not in where.parents:
    sys.exit(f"check_package: innerloop was imported from {where}, not from the fresh venv {venv}")
if innerloop.__version__ != version or importlib.metadata.version("innerloop") != version:
    sys.exit(f"check_package: installed version {innerloop.__version__} != pyproject.toml's {version}")
typed = where.parent / "py.typed"
if not typed.is_file():
    sys.exit(f"check_package: {typed} is not installed")
print(f"innerloop {innerloop.__version__} from {where.parent}")
EOF
"$WORK/venv/bin/innerloop" train --config "$ROOT/configs/sinusoid_maml.toml" --out "$WORK/run" \
  --iterations 3 --set eval.test_tasks=50 --set train.val_tasks=20 --no-progress > "$WORK/train.log" 2>&1 \
  || { cat "$WORK/train.log" >&2; echo "check_package: innerloop train failed (log above)." >&2; exit 1; }
tail -n 8 "$WORK/train.log"
grep -q "50 fixed test tasks" "$WORK/train.log" \
  || { echo "check_package: innerloop train did not take --set eval.test_tasks=50" >&2; exit 1; }
for f in best.pt last.pt results.json results.md metrics.jsonl fits.png adaptation.png; do
  test -s "$WORK/run/$f" || { echo "check_package: the run wrote no $f" >&2; exit 1; }
done
"$WORK/venv/bin/innerloop" eval "$WORK/run/best.pt" --tasks 20 --steps 1 > "$WORK/eval.log" 2>&1 \
  || { cat "$WORK/eval.log" >&2; echo "check_package: innerloop eval failed (log above)." >&2; exit 1; }
tail -n 4 "$WORK/eval.log"

step "package check passed"
