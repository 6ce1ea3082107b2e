# The README's two commands, plus the rest of the developer loop.
.PHONY: serve serve-kserve stop test lint bench archive

serve:  ## set up, build the default archive if missing, start TorchServe on loopback
	scripts/serve.sh

serve-kserve:  ## the default model on KServe's own model server: REST 127.0.0.1:8085, gRPC 127.0.0.1:8086
	scripts/serve_kserve.sh

stop:  ## stop the servers `make serve` and `make serve-kserve` started
	scripts/stop.sh

test:  ## set up (venv, pinned packages, Java) and run every test
	scripts/bootstrap.sh test
	.venv/bin/python -m pytest

lint:
	scripts/bootstrap.sh test
	.venv/bin/ruff check handler scripts tests deploy

archive:  ## rebuild the default archive
	scripts/bootstrap.sh
	.venv/bin/python scripts/archive.py --force

bench:  ## Grad-CAM engine benchmark (table + JSON in bench_results/)
	scripts/bootstrap.sh test
	.venv/bin/python scripts/bench_cam.py
