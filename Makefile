# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench api-docs clean

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (set PYTHON=...)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch is pinned (constraints.txt) to the local CPU wheel; an unpinned torch pulls CUDA builds.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[ckks,test,flower,docs]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/fedmm-secure run --epsilon 8 --epsilon-budget 10 --methods local,fedavg,fedmm --out runs/demo
	@# Gate on what the deployment releases (fedmm's own ledger). The baselines trained on the
	@# same data are accounted too: the run's printout and the report show each market's total,
	@# which `budget check` (default --scope total) gates on.
	$(BIN)/fedmm-secure budget check runs/demo --max-epsilon 10 --scope deployed
	$(BIN)/fedmm-secure report runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest tests -p no:cacheprovider --timeout=900

# Every suite in bench/, the report tables included (tests without the benchmark fixture:
# DP-SGD memory and interleaved ratios, CKKS comparison, accountant accuracy, masking floor
# ratios and scaling); -s shows the tables.
bench: $(STAMP)
	$(BIN)/python -m pytest bench -s -p no:cacheprovider --timeout=3600

# docs/api.md (Markdown, committed) and docs/api/ (HTML with search, by pdoc) from the docstrings.
api-docs: $(STAMP)
	$(BIN)/python docs/gen_api.py
	$(BIN)/pdoc fedmm_secure -o docs/api --docformat restructuredtext

clean:
	rm -rf runs .pytest_cache build *.egg-info
