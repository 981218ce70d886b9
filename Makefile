# Two commands do all the set-up on a fresh Linux machine with Python 3.11:
#   make run    create .venv, install, start the app on the shipped model
#   make test   create .venv, install, run the tests
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt | sha256sum | cut -c1-12)
PORT   ?= 8501

.PHONY: run test browser bench clean

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	rm -f $(VENV)/.installed-*
	touch $@

run: $(STAMP)
	$(BIN)/streamlit run app.py --server.port $(PORT)

# The real-browser test needs Debian's chromium; it is skipped (with a reason) when absent.
browser:
	@bash scripts/install_browser.sh

test: $(STAMP) browser
	$(BIN)/python -m pytest -ra

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV)
