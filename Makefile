# The README's commands. Each target sets up .venv first when it is missing or stale.
#   make demo     synthetic log -> train DLRM on 2 local Ray workers -> evaluate -> export -> predict
#   make test     lint + the whole test suite, multi-rank and Ray tests included
#   DEVICE=cuda make ...   installs the CUDA builds (torch from PyPI, fbgemm-gpu) instead
SHELL := /bin/bash
PYTHON ?= python3
DEVICE ?= cpu
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-$(DEVICE)

ifeq ($(DEVICE),cuda)
# The CPU wheel of torch 2.13.0 lies in a local find-links folder on these machines; the
# CUDA build must come from the registry, so local wheels are switched off for this step.
TORCH_STEP := PIP_FIND_LINKS= $(PIP) install torch==2.13.0 fbgemm-gpu==1.8.0
else
TORCH_STEP := $(PIP) install torch==2.13.0 fbgemm-gpu-cpu==1.8.0
endif

.PHONY: venv demo test lint bench-ingest clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py tables/collisionless/csrc/idmap_native.cpp Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(TORCH_STEP) -q
	# torchrec without its declared deps: they would replace the fbgemm build above.
	$(PIP) install -q --no-deps torchrec==1.8.0
	# The ID map's native kernels compile against the torch installed above, in place.
	$(PIP) install -q 'setuptools>=68' wheel
	$(PIP) install -q --no-build-isolation -e '.[dev]'
	# git ignores the built library through .git/info/exclude, not .gitignore: Ray reads
	# .gitignore when it uploads a job's --working-dir, and the job needs the library.
	if [ -d .git/info ]; then grep -qxF 'tables/collisionless/_*.so' .git/info/exclude \
		|| echo 'tables/collisionless/_*.so' >> .git/info/exclude; fi
	rm -f $(VENV)/.installed-*
	touch $@

DEMO_ROWS ?= 400000

demo: $(STAMP)
	rm -rf out/demo
	$(VENV)/bin/recsys gen-data conf/demo.yaml --rows $(DEMO_ROWS) --out out/demo/log
	$(VENV)/bin/recsys train conf/demo.yaml
	$(VENV)/bin/recsys evaluate --checkpoint out/demo/runs/demo --data out/demo/log/day=2026-01-04
	$(VENV)/bin/recsys export --checkpoint out/demo/runs/demo --out out/demo/export
	$(VENV)/bin/recsys predict --export out/demo/export --data out/demo/log/day=2026-01-04 \
		--with-metrics --out out/demo/predictions.parquet
	$(PY) -c "import glob, json; g = json.load(open('out/demo/log/_generator.json')); \
		e = json.load(open(sorted(glob.glob('out/demo/runs/demo/eval/*/report.json'))[-1])); \
		print(f\"demo: held-out AUC {e['auc']:.4f}, generator's oracle AUC on that day \
		{g['oracle_auc_per_day']['2026-01-04']:.4f}\")"

lint: $(STAMP)
	$(VENV)/bin/ruff check recsys tables models pipelines tests bench

test: $(STAMP) lint
	$(VENV)/bin/pytest -q

bench-ingest: $(STAMP)
	$(PY) bench/ingest.py

clean:
	rm -rf $(VENV) out runs build tables/collisionless/_*.so .pytest_cache .ruff_cache *.egg-info
