# Every target does its own set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-quick lint bench bench-speed clean package-check docs

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The pinned CPU torch first: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# dev tools, the MuJoCo and Meta-World extras (so the HalfCheetah and Meta-World tests run rather
	# than skip) and the docs tools
	$(PY) -m pip install -q -e ".[dev,rl,metaworld,docs,tensorboard,wandb]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/innerloop train

# Everything: lint, types (mypy), the import layers (import-linter), every test.
test: lint
	$(PY) -m pytest

# For development: the same checks, without the slow tests (processes, real data, whole runs).
test-quick: lint
	$(PY) -m pytest -m "not slow"

# The documentation site into site/, strict: a warning, a broken link or a docstring that does not
# render fails the build (tests/test_docs.py runs the same build and every python block of docs/).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

lint: $(STAMP)
	$(VENV)/bin/ruff check innerloop tests benchmarks examples
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# The package as a user gets it: build, twine check, the wheel in a fresh venv, innerloop train from it.
package-check: $(STAMP)
	PYTHON=$(PY) bash tools/check_package.sh

bench: $(STAMP)
	$(PY) benchmarks/sinusoid_table.py

# MAML speed and memory against learn2learn, higher and torchopt (their own environment, .venv-bench).
bench-speed:
	test -x .venv-bench/bin/python || bash benchmarks/speed/make_env.sh
	.venv-bench/bin/python benchmarks/speed/bench.py --threads 2 --rounds 2 --iters 10 --warmup 1 --bf16-iters 1 \
		--lever-iters 5 --settings omniglot-2nd omniglot-1st sinusoid-2nd sinusoid-1st --tag speed
	.venv-bench/bin/python benchmarks/speed/bench.py --threads 2 --rounds 1 --iters 5 --warmup 1 --meta-batch 8 \
		--settings omniglot-5step-2nd omniglot-20way-5step-2nd --tag speed_steps
	.venv-bench/bin/python benchmarks/speed/bench.py --threads 2 --settings --sweeps --sweep-iters 3 --tag speed_sweeps
	.venv-bench/bin/python benchmarks/speed/bench.py --mode parity --threads 2 --settings omniglot-2nd omniglot-1st \
		--tag speed_parity
	.venv-bench/bin/python benchmarks/speed/bench.py --mode parity --threads 2 --meta-batch 8 \
		--settings omniglot-5step-2nd --tag speed_parity_5step
	.venv-bench/bin/python benchmarks/speed/levers.py

clean:
	rm -rf $(VENV) runs .pytest_cache site
