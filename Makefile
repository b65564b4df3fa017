# `make test` and `make book` first create or refresh .venv from requirements.txt (only when it or
# pyproject.toml changed: the stamp file records the last install).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test book lint notebooks clean browser-check translations

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Lint, run every chapter in the smoke profile under nbval, build the book with warnings as
# errors, then the test suite (whose book checks read the fresh HTML).
# OMP_WAIT_POLICY=PASSIVE: on a shared two-core machine, spinning OpenMP threads slow torch down
# by ten times or more whenever another process holds a core (a 32 s test ran for 25 minutes).
# pytest-xdist: TEST_WORKERS processes (2: one a core of a CI machine; `make test TEST_WORKERS=0`
# runs in this process). The chapters go whole to a worker (--dist loadfile: a notebook's cells
# in order, in one kernel); the tests are handed out one by one and idle workers steal queued ones
# (--dist worksteal). Under xdist each test worker runs torch on one thread (tests/conftest.py).
TEST_WORKERS ?= 2
test: lint
	OMP_WAIT_POLICY=PASSIVE DDPM_PROFILE=smoke $(BIN)/python -m pytest -q -p no:cacheprovider \
		-n $(TEST_WORKERS) --dist loadfile \
		--nbval-lax --nbval-sanitize-with .ci/nbval_sanitize.cfg book/[0-9]*.ipynb
	$(BIN)/jupyter-book build . --warningiserror --nitpick --keep-going
	$(BIN)/python .ci/build_book.py html zh_CN
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_translations.py
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

# Re-execute every chapter in the cpu profile (the budget of the committed outputs) and save it
# (OMP_WAIT_POLICY=PASSIVE as for the tests).
notebooks: $(STAMP)
	for nb in book/[0-9]*.ipynb; do \
		echo "== $$nb"; \
		OMP_WAIT_POLICY=PASSIVE DDPM_PROFILE=cpu $(BIN)/jupyter nbconvert --to notebook --execute --inplace \
			--ExecutePreprocessor.timeout=1800 --ExecutePreprocessor.kernel_name=python3 $$nb \
			|| exit 1; \
	done
	$(BIN)/python .ci/normalize_notebooks.py book/*.ipynb

# English at _build/html/, Chinese at _build/html/zh/ (from locales/zh_CN: .ci/build_book.py, which
# adds language = zh_CN to Jupyter Book's own configuration; both with -W, --nitpick, --keep-going).
book: $(STAMP)
	$(BIN)/jupyter-book build . --warningiserror --nitpick --keep-going
	$(BIN)/python .ci/build_book.py html zh_CN

# Regenerate the Chinese catalogs from the current English: new messages appear untranslated,
# changed ones become fuzzy (tests/test_translations.py fails on both until they are translated).
translations: $(STAMP)
	$(BIN)/python .ci/build_book.py gettext
	$(BIN)/sphinx-intl update -p _build/gettext -l zh_CN -d locales --line-width -1

# Every page of the built book in headless Chromium with the network off: math typeset, images
# loaded, animation controls present, no console errors. Needs Debian's chromium; not in `make test`.
browser-check: book
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r .ci/browser-requirements.txt
	$(BIN)/python .ci/browser_check.py _build/html _build/html/zh

clean:
	rm -rf _build
