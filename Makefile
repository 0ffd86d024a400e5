# Two commands on a fresh machine: `make demo` (install + synthetic demo run) and `make test`.
PY ?= python3

.PHONY: install install-dev demo test
install:
	$(PY) -m pip install -r requirements.txt

install-dev:
	$(PY) -m pip install -r requirements.txt -r requirements-dev.txt

demo: install
	rm -rf output_demo && $(PY) trainer.py --demo

test: install-dev
	$(PY) -m pytest -q
