# Two commands do all the set-up on a fresh Linux machine with Python 3.11:
#   make run    create .venv, install, start the app on the shipped model
#   make test   create .venv, install, run the tests
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt | sha256sum | cut -c1-12)
PORT   ?= 8501

.PHONY: run test browser pacs cluster bench clean

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	rm -f $(VENV)/.installed-*
	touch $@

# This machine only (127.0.0.1), no login needed: one person at the machine, as admin.
run: $(STAMP)
	$(BIN)/streamlit run app.py --server.address 127.0.0.1 --server.port $(PORT)

# Shared on the network: refuses to start unless a login is configured (MAMMO_AUTH_FILE or
# [auth] + [mammo_roles] in .streamlit/secrets.toml); see docs/DEPLOYMENT.md.
serve: $(STAMP)
	MAMMO_NETWORK=1 $(BIN)/python -m mammo_core.auth check-serve $(SERVE_ADDRESS)
	MAMMO_NETWORK=1 $(BIN)/streamlit run app.py --server.address $(SERVE_ADDRESS) --server.port $(PORT) --server.headless true

# The real-browser test needs Debian's chromium; it is skipped (with a reason) when absent.
browser:
	@bash scripts/install_browser.sh

# The PACS tests need Debian's orthanc, orthanc-dicomweb, dcmtk and dicom3tools; skipped (with a reason) when absent.
pacs:
	@bash scripts/install_pacs.sh

# Ray (predict --engine ray) and psycopg into the venv, Debian's postgresql for the audit tests; skipped (with a reason) when absent.
cluster: $(STAMP)
	@PY=$(BIN)/python bash scripts/install_cluster.sh

test: $(STAMP) browser pacs cluster
	$(BIN)/python -m pytest -ra

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV)
