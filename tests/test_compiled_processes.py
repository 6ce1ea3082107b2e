"""The compiled serve path across processes: a restarted frozen worker finds every graph in
inductor's cache, kernels shipped in an archive load in a new pod (and are refused where built
for another torch), and a cold background compile's one process-wide fx trace is made before
serving starts. Each test starts fresh Python processes with their own caches.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import DATA, ROOT, run_archiver
from support.compiled import kernel_cache  # noqa: F401 (fixture: no test here writes ~/.cache)
from support.tinynet import tinynet_class
from test_handler import model_dir  # noqa: F401 (fixture)

# Every test here compiles: `make test-fast` leaves them out (-m "not compile").
pytestmark = pytest.mark.compile


def test_a_restarted_frozen_worker_finds_every_graph_in_inductors_cache(model_dir, tmp_path):  # noqa: F811
    """A frozen backbone holds its weights as constants: were its conv weights pre-packed (oneDNN
    tensors, which the graph cache cannot pickle), inductor would skip caching it and every
    restarted worker would compile it again. Two worker starts, each in a fresh process; the
    second serves other weights (a retrained model on the same machine), which a cached graph
    must not replace by the first's."""
    from safetensors.torch import load_file, save_file

    retrained = tmp_path / "retrained"
    shutil.copytree(model_dir, retrained)
    weights = load_file(str(model_dir / "model.safetensors"))
    save_file({k: v.flip(0) if v.ndim and v.shape[0] > 1 else v for k, v in weights.items()},
              str(retrained / "model.safetensors"))
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from test_handler import _batch, _handler, _png\n"
        "from torch._dynamo.utils import counters\n"
        "folder = Path(sys.argv[1])\n"
        "compiled = _handler(folder, compile='on', compile_start='load', compile_freeze='on',\n"
        f"                   compile_batch='dynamic', compile_cache_dir={str(tmp_path / 'inductor')!r})\n"
        "items = [{'body': _png()}, {'body': _png((60, 90))}]\n"
        "answers = [_batch(*h, items)[1] for h in (compiled, _handler(folder))]\n"
        "print(json.dumps({'counters': dict(counters['inductor']), 'compiled': answers[0], 'eager': answers[1]}))\n")
    runs = []
    for folder in (model_dir, retrained):
        # The child imports test_handler as pytest does: from the tests folder.
        env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
        done = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True,
                              timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    first, second = (run["counters"] for run in runs)
    assert first.get("fxgraph_cache_bypass", 0) == 0, first
    assert first.get("fxgraph_cache_miss", 0) >= 2, first  # the frozen backbone and the head at least
    assert second.get("fxgraph_cache_bypass", 0) == 0 and second.get("fxgraph_cache_miss", 0) == 0, second
    assert second["fxgraph_cache_hit"] == first["fxgraph_cache_miss"], (first, second)
    for run in runs:  # each start serves its own weights, as its eager worker does
        for got, want in zip(run["compiled"], run["eager"], strict=True):
            assert [p["class_id"] for p in got["predictions"]] == [p["class_id"] for p in want["predictions"]]
            assert [p["probability"] for p in got["predictions"]] == pytest.approx(
                [p["probability"] for p in want["predictions"]], abs=1e-4)
            torch.testing.assert_close(torch.tensor(got["cams"][0]["map"]), torch.tensor(want["cams"][0]["map"]),
                                       atol=2e-3, rtol=0)
    assert runs[0]["eager"] != runs[1]["eager"]  # other weights, other answers: the check is not vacuous



_WORKER = r"""
import json, logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s", stream=sys.stderr)
from torch._dynamo.utils import counters
from handler.pipeline import Archive, Pipeline
from handler.requests import RawRequest
pipeline = Pipeline(Archive.from_dir(sys.argv[1]), "cpu")
answer = pipeline.run([RawRequest(Path(sys.argv[2]).read_bytes(), {"cam_classes": "top2"}, "raw")])[0]
print(json.dumps({"compiled": pipeline.compiled is not None, "hits": counters["inductor"]["fxgraph_cache_hit"],
                  "misses": counters["inductor"]["fxgraph_cache_miss"], "body": json.loads(answer.text)}))
"""


def _new_pod_worker(folder: Path, root: Path) -> tuple[subprocess.Popen, Path]:
    """A worker compiling ``folder`` at load in a new process with a fresh HOME, TMPDIR and cache,
    started and not waited for; its output goes to files in ``root`` (:func:`_pod_answer`)."""
    for sub in ("home", "tmp", "cache"):
        (root / sub).mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env.update(HOME=str(root / "home"), TMPDIR=str(root / "tmp"), XDG_CACHE_HOME=str(root / "cache"))
    with open(root / "stdout", "w") as out, open(root / "stderr", "w") as err:
        pod = subprocess.Popen([sys.executable, "-c", _WORKER, str(folder), str(DATA / "chelsea.jpg")], cwd=ROOT,
                               env=env, stdout=out, stderr=err)
    return pod, root


def _pod_answers(pods: list[tuple[subprocess.Popen, Path]]) -> list[tuple[dict, str]]:
    """Each :func:`_new_pod_worker`'s answer (what it printed) and log, once all have exited."""
    try:
        for pod, _ in pods:
            pod.wait(timeout=600)
    finally:
        for pod, _ in pods:
            if pod.poll() is None:
                pod.kill()
                pod.wait()
    answers = []
    for pod, root in pods:
        log = (root / "stderr").read_text()
        assert pod.returncode == 0, log[-3000:]
        answers.append((json.loads((root / "stdout").read_text().strip().splitlines()[-1]), log))
    return answers


def test_shipped_kernels_load_where_they_fit_and_are_refused_with_one_line_where_not(tmp_path):
    """gradcam-archive --ship-kernels: a new pod's worker installs the archive's kernels and
    compiles from inductor's cache (hits, no misses), answering exactly as a worker without
    them; kernels built for another torch version are refused with one log line, not loaded,
    and that worker compiles from scratch and answers the same."""
    from handler.kernels import KERNELS, KEY_FILE

    weights = tmp_path / "tinynet.pt"
    torch.save(tinynet_class()(num_classes=3).state_dict(), weights)
    run_archiver("-q", "--export-path", str(tmp_path), "--model", f"{DATA / 'tinynet' / 'model.py'}:TinyNet",
                 "--num-classes", "3", "--weights", str(weights), "--name", "tiny", "--input-size", "64",
                 "--compile", "on", "--channels-last", "off", "--compile-freeze", "off", "--compile-start", "load",
                 "--batch-size", "1", "--ship-kernels", check=True)  # one batch size: one set of graphs
    folder = tmp_path / "tiny"
    with zipfile.ZipFile(tmp_path / "tiny.mar") as mar:
        mar.extractall(folder)
    key = json.loads((folder / KEY_FILE).read_text())
    assert key["torch"] == torch.__version__ and key["cpu_isa"] == torch.backends.cpu.get_cpu_capability()
    assert any((folder / KERNELS).rglob("*.so"))

    # The same archive but for its key: kernels built for another torch version.
    other = tmp_path / "tiny_other_torch"
    shutil.copytree(folder, other)
    (other / KEY_FILE).write_text(json.dumps({**key, "torch": "2.0.0"}))
    # Two new pods at once: separate processes, each with its own fresh HOME, TMPDIR and cache.
    pods = [_new_pod_worker(folder, tmp_path / "pod1"), _new_pod_worker(other, tmp_path / "pod2")]
    (shipped, log), (refused, refused_log) = _pod_answers(pods)
    assert shipped["compiled"] and "installed" in log and "shipped compiled kernel files" in log
    assert shipped["hits"] > 0 and shipped["misses"] == 0, shipped

    log = refused_log
    lines = [line for line in log.splitlines() if "shipped compiled kernels not used" in line]
    assert len(lines) == 1 and f"built for torch 2.0.0; this worker has torch {torch.__version__}" in lines[0]
    assert refused["compiled"] and refused["hits"] == 0 and refused["misses"] > 0, refused
    assert refused["body"] == shipped["body"]  # the same answers, with or without shipped kernels


def test_a_background_compile_makes_no_process_wide_fx_trace_once_primed(tmp_path):
    """torch.fx's symbolic trace patches nn.Module.__call__ for the whole process while it runs, so
    an eager forward served meanwhile by another thread fails ("module is not installed as a
    submodule": 8 requests got 500s under load during a cold background compile). Inductor makes
    one such trace per process, on its first compile; the pipeline makes it before compiling in the
    background (handler.compiled.prime_tracing). A cold compile in a fresh process makes it
    without the priming, and none after it."""
    runs = {mode: subprocess.Popen([sys.executable, str(ROOT / "tests" / "support" / "fx_traces.py"), mode,
                                    str(tmp_path / mode)], cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
            for mode in ("no-prime", "prime")}  # side by side: two cold compiles in fresh processes
    traces = {}
    try:
        for mode, run in runs.items():
            out, err = run.communicate(timeout=600)
            assert run.returncode == 0, err[-3000:]
            traces[mode] = json.loads(out.strip().splitlines()[-1])["plain_traces"]
    finally:
        for run in runs.values():
            if run.poll() is None:
                run.kill()
                run.wait()
    assert len(traces["no-prime"]) == 1 and "_dummy_gm" in traces["no-prime"][0], traces
    assert traces["prime"] == [], traces
