# kiln: `make train` and `make test` set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
# The local CPU build on dev machines; GPU clusters override, e.g. TORCH_SPEC="torch==2.13.0 --index-url ..."
TORCH_SPEC ?= torch==2.13.0
RECIPE ?= recipes/tiny.yaml
# The versions the tests passed with (all but kiln, torch and triton: TORCH_SPEC picks the build)
CONSTRAINTS ?= constraints.txt
BIN := $(VENV)/bin
STAMP := $(VENV)/.kiln-installed
# TORCH_SPEC as last installed: rewritten only when it changes, so a new spec reinstalls
SPEC := $(VENV)/.kiln-torch-spec

.PHONY: train test bench venv clean wheelhouse gpu-check slurm-up slurm-down constraints FORCE

$(SPEC): FORCE
	@mkdir -p $(VENV)
	@if [ "$$(cat $@ 2>/dev/null)" != '$(TORCH_SPEC)' ]; then echo '$(TORCH_SPEC)' > $@; fi

$(STAMP): pyproject.toml $(CONSTRAINTS) $(SPEC)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel
	$(BIN)/pip install $(TORCH_SPEC)
	$(BIN)/pip install -c $(CONSTRAINTS) -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# After an upgrade the tests pass with: pin the venv's versions (the header comment is kept)
constraints: $(STAMP)
	{ grep '^#' $(CONSTRAINTS); $(BIN)/pip freeze --exclude-editable | grep -v '^kiln==\|^torch==\|^triton=='; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

train: $(STAMP)
	$(BIN)/kiln train $(RECIPE) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	for b in $(filter-out bench/gpu_check.py,$(wildcard bench/*.py)); do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# The GPU check's packages for the GPU image (CPython 3.12, no registry there): docs/gpu.md
wheelhouse: $(STAMP)
	$(BIN)/python bench/gpu/wheelhouse.py --out wheelhouse

# On the GPU machine: python3 bench/gpu_check.py (docs/gpu.md); here GPU_CHECK_ARGS=--dry-run runs it on CPU
gpu-check:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,python3) bench/gpu_check.py $(GPU_CHECK_ARGS)

# A throw-away Slurm cluster on this machine (slurmctld + slurmd, auth/none, state in
# /tmp/kiln-slurm; installs slurm-wlm with apt when missing). tests/slurm starts its own through the
# same script, so `make test` needs neither target.
slurm-up:
	slurm/local_cluster.sh up

slurm-down:
	slurm/local_cluster.sh down

clean:
	rm -rf $(VENV) runs .kiln-cache
