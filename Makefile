# The README's two commands, plus the rest of the developer loop.
.PHONY: serve serve-kserve stop test test-fast lint bench archive

serve:  ## set up, build the default archive if missing, start TorchServe on loopback
	scripts/ops/serve.sh

serve-kserve:  ## the default model on KServe's own model server: REST 127.0.0.1:8085, gRPC 127.0.0.1:8086
	scripts/ops/serve_kserve.sh

stop:  ## stop the servers `make serve` and `make serve-kserve` started
	scripts/ops/stop.sh

test:  ## set up (venv, pinned packages, Java) and run every test, in two processes
	scripts/ops/bootstrap.sh test
	.venv/bin/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

test-fast:  ## the unit tier: no server, no compiling (a few minutes)
	scripts/ops/bootstrap.sh test
	.venv/bin/python -m pytest -m "not server and not compile"

lint:
	scripts/ops/bootstrap.sh test
	.venv/bin/ruff check handler devkit scripts tests deploy

archive:  ## rebuild the default archive
	scripts/ops/bootstrap.sh
	.venv/bin/gradcam-archive --force

bench:  ## Grad-CAM engine benchmark (table + JSON in bench_results/)
	scripts/ops/bootstrap.sh test
	.venv/bin/python scripts/bench/bench_cam.py
