# The two commands of the README's quick start. Both set up .venv first and are safe to rerun.
.PHONY: demo test setup setup-dev lint

demo: setup
	.venv/bin/selftune demo

# lint first: a style error fails the run in seconds, before the suite's minutes
test: lint
	.venv/bin/python -m pytest -q --durations=15

setup:
	bash scripts/setup.sh

setup-dev:
	bash scripts/setup.sh dev

lint: setup-dev
	.venv/bin/ruff check selftune tests bench
	.venv/bin/ruff format --check selftune tests bench
