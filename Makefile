# Two commands for a newcomer: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Offline by default: no model downloads at run time.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo test test-fast test-study repro venv clean-venv chromium

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.txt
	@# The package itself, editable: stages, bench and tests import `medicsynth` from the checkout.
	$(BIN)/pip install --disable-pip-version-check -q --no-deps -e .
	$(BIN)/pip check
	touch $@

## Create .venv, install pinned requirements, run the whole pipeline on the embedded demo (CPU).
demo: venv
	$(BIN)/dvc repro
	@# The headline is the comparison table; everything else is in the report page.
	@awk '/^## Macro-F1 per task/{p=1} /^## damage_severity/{p=0} p' metrics/compare.md
	@echo "Report (open in a browser, works offline): $(abspath report/public.html)"
	@echo "  with images (private edition, do not publish): $(abspath report/private.html)"
	@echo "Headline metrics: dvc metrics show; per-class detail: metrics/compare.md; curves: dvc plots show"

## Debian's headless chromium for the browser tests (installed with apt-get when missing and run as root).
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; \
	else echo "chromium missing and not root: the browser tests will skip (sudo apt-get install -y chromium)"; fi

## Run the test suite (installs chromium for the browser tests when missing, see `chromium`).
test: venv chromium
	$(BIN)/python -m pytest -q -m "not study" tests

## The study preset end to end on the tiny demo with loopback API servers (~10 min on 2 cores).
test-study: venv
	$(BIN)/python -m pytest -q -m study tests

## The quick tests only: skips the end-to-end DVC runs and other slow tests (markers in pyproject.toml).
test-fast: venv
	$(BIN)/python -m pytest -q -m "not e2e and not slow" tests

repro: venv
	$(BIN)/dvc repro

clean-venv:
	rm -rf $(VENV)

.PHONY: accept-agreement pull-private push-private private-status reproduce-private
# The private targets check a *recorded acceptance* of AGREEMENT.md (.dvc/agreement.local.json)
# before any byte of a private output moves. That is not access control: access is the S3 key
# the maintainers issue after it. See docs/PRIVATE_REMOTE.md.

## Accept AGREEMENT.md. On a terminal, `make accept-agreement` asks for name, contact and purpose,
## shows the text and asks you to type "I agree". In scripts: NAME="..." CONTACT=... PURPOSE="..."
## YES=1 (after reading it). Rules: single non-empty lines; PURPOSE >= 10 characters.
accept-agreement: venv
	$(BIN)/python -m medicsynth.agreement accept \
	  $(if $(NAME),--name "$(NAME)") $(if $(CONTACT),--contact "$(CONTACT)") \
	  $(if $(PURPOSE),--purpose "$(PURPOSE)") $(if $(YES),--yes)

## Collaborators, on a fresh clone: check the acceptance, pull every private output and the
## run-cache, reproduce what cannot be pulled (the one documented command).
reproduce-private: venv
	$(BIN)/python -m medicsynth.private_remote reproduce

## Pull private artifacts (needs the accepted agreement and S3 credentials); TARGETS="train" limits it.
pull-private: venv
	$(BIN)/python -m medicsynth.private_remote pull $(TARGETS)

## Push private outputs and the run-cache (maintainers; instead of the `dvc push` DVC suggests).
push-private: venv
	$(BIN)/python -m medicsynth.private_remote push --run-cache $(TARGETS)

## Agreement, credentials, the outputs routed to the private remote, and outputs routed nowhere.
private-status: venv
	$(BIN)/python -m medicsynth.private_remote status

.PHONY: study-apply study-exp
## The study (presets/study.yaml) as a DVC experiment named `study`: queued with the preset applied,
## params.yaml restored afterwards; `dvc queue start` runs it, `dvc exp show` lists it.
study-exp: venv
	$(BIN)/python -m medicsynth.presets check presets/study.yaml
	cp params.yaml .params.yaml.before-study
	$(BIN)/python -m medicsynth.presets apply presets/study.yaml
	$(BIN)/dvc exp run --queue -n study; status=$$?; mv .params.yaml.before-study params.yaml; exit $$status
	@echo "queued: run it with 'dvc queue start', then 'dvc exp show'"

## Apply presets/study.yaml to params.yaml in the workspace (comments kept; `git diff params.yaml` shows it).
study-apply: venv
	$(BIN)/python -m medicsynth.presets apply presets/study.yaml

.PHONY: estimate
## Print the paid-API cost per stage and in total, for params.yaml as it is and for a MEDIC-sized
## plan (71,198 images), at sync and batch prices (llm.prices). Calls nothing.
estimate: venv
	$(BIN)/python -m medicsynth.llm.plan --params params.yaml
