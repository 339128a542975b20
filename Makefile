# The two commands a newcomer needs: `make run` and `make test` (see README.md).
.PHONY: run test demo venv lint bench

venv:
	@bash scripts/bootstrap.sh

run: venv
	.venv/bin/tuneloop serve

test: venv
	.venv/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

demo: venv
	.venv/bin/python examples/banking77/demo.py

lint: venv
	.venv/bin/ruff check service adapters monitoring tests benchmarks examples
