"""The compiled serve path in a worker: every batch size served without a recompile after load,
a background compile that switches between batches, a worker that cannot compile serving eager,
the archiver's auto timing, and a compiled archive on a real TorchServe.

The CPU workers here compile TinyNet at 64 px, batches of up to 4, in the file's inductor cache:
the archiver's timing and the real server's worker find the same graphs there, as a restarted
worker would.
"""

from __future__ import annotations

import json
import logging
import threading

import numpy as np
import pytest
import torch
from support.compiled import kernel_cache  # noqa: F401 (fixture)
from test_handler import _batch, _handler, _png, model_dir  # noqa: F401 (fixture)

from handler.compiled import CompiledPass

# Every test here compiles: `make test-fast` leaves them out (-m "not compile").
pytestmark = pytest.mark.compile


def _worker(model_dir, gpu: int | None = None, batch_size: int = 8, **handler):  # noqa: F811
    """test_handler's TinyNet worker, with TorchServe's batchSize ``batch_size``."""
    from test_handler import _config
    from ts.context import Context

    from handler.service import GradCamHandler

    config = {**_config(**handler), "batchSize": batch_size}
    manifest = {"model": {"modelName": "tinynet", "serializedFile": "model.safetensors"}}
    context = Context("tinynet", str(model_dir), manifest, batch_size, gpu, "0.12.0", model_yaml_config=config)
    service = GradCamHandler()
    service.initialize(context)
    return service, context


# The CPU workers below take batches of up to 4 (buckets 1/2/4: the sizes of
# _answers_as_eager_in_batches_of_1_to_4), channels-last: the layout the archive served by a real
# TorchServe below uses, so that its worker and the archiver's timing find these graphs in the
# module's cache instead of compiling them again.
CPU_WORKER = {"batch_size": 4, "channels_last": "on"}


def _compiled_handler(model_dir, caplog, gpu: int | None = None, **handler):  # noqa: F811
    with caplog.at_level(logging.INFO):
        return _worker(model_dir, gpu, compile="on", compile_start="load", **handler)


def _answers_as_eager_in_batches_of_1_to_4(eager, compiled) -> None:
    """Batches of 1..4 requests (buckets 1, 2, 4, 4), one of them bad, one with a quality score
    (its extra pass runs the eager model inside the compiled one): the compiled worker's
    statuses, classes, maps and scores equal the eager worker's."""
    items = [{"body": _png()}, {"image": _png((40, 90)), "cam_classes": "top2", "cam_method": "gradcam++",
                                "quality": "true"},
             {"body": b"not an image"}, {"body": _png((70, 30)), "outputs": "map,heatmap"}]
    for n in range(1, len(items) + 1):
        want_status, want = _batch(*eager, items[:n])
        got_status, got = _batch(*compiled, items[:n])
        assert got_status == want_status
        for g, w in zip(got, want):
            if "error" in w:
                assert g["error"] == w["error"]
                continue
            assert [p["class_id"] for p in g["predictions"]] == [p["class_id"] for p in w["predictions"]]
            for gc, wc in zip(g["cams"], w["cams"], strict=True):
                assert gc["class_id"] == wc["class_id"]
                torch.testing.assert_close(torch.tensor(gc["map"]), torch.tensor(wc["map"]), atol=2e-3, rtol=0)
                assert ("quality" in gc) == ("quality" in wc)
                if "quality" in wc:
                    assert gc["quality"]["fraction"] == wc["quality"]["fraction"]
                    assert abs(gc["quality"]["kept_confidence"] - wc["quality"]["kept_confidence"]) < 1e-3


def test_a_compiled_worker_answers_as_the_eager_one_with_no_compiling_after_load(model_dir, kernel_cache,  # noqa: F811
                                                                              caplog):
    from torch._dynamo.utils import counters

    eager, eager_context = _worker(model_dir, **CPU_WORKER)
    before = dict(counters["inductor"])
    service, context = _compiled_handler(model_dir, caplog, compile_cache_dir=str(kernel_cache),
                                         compile_freeze="on", **CPU_WORKER)
    compiled = service.pipeline.compiled
    assert compiled is not None and compiled.sizes == (1, 2, 4) and compiled.frozen
    assert ("compiled model_src/model.py:TinyNet (inductor, default mode, backbone frozen) for batch sizes "
            "1/2/4") in caplog.text
    # The cache a restarted worker finds: every graph (the backbone and the head at least, per
    # batch size) looked up in the configured folder, none left out of it.
    looked_up = sum(counters["inductor"][k] - before.get(k, 0) for k in ("fxgraph_cache_hit", "fxgraph_cache_miss"))
    assert looked_up >= 2 * len(compiled.sizes), dict(counters["inductor"])
    assert counters["inductor"]["fxgraph_cache_bypass"] == before.get("fxgraph_cache_bypass", 0)
    assert compiled.cache == str(kernel_cache) and any(kernel_cache.iterdir())
    frames_after_load = counters["stats"]["unique_graphs"]
    _answers_as_eager_in_batches_of_1_to_4((eager, eager_context), (service, context))
    assert counters["stats"]["unique_graphs"] == frames_after_load, "a batch size compiled after load"
    assert "new graph(s) after load" not in caplog.text
    # TorchServe never hands over more than batchSize requests; if anything did compile anew,
    # the worker says so.
    statuses, _ = _batch(service, context, [{"body": _png()}] * 5)
    assert statuses == [200] * 5
    assert "a batch of 5 compiled" in caplog.text


def test_a_compiled_worker_serves_eager_from_the_first_batch_then_switches_between_batches(
        model_dir, kernel_cache, caplog, monkeypatch):  # noqa: F811
    """compile_start: background (the default): ready at once; batches answered while the model
    compiles equal the eager worker's exactly; once every batch size is compiled the next batch
    runs compiled (same classes, maps within 2e-3); no batch fails on the way. The compile waits
    for the test's go (graphs cached by earlier tests could otherwise finish before any batch)."""
    import handler.pipeline

    go = threading.Event()

    class HeldBack(CompiledPass):
        def warm_up(self, run):
            assert go.wait(300)
            return super().warm_up(run)

    monkeypatch.setattr(handler.pipeline, "CompiledPass", HeldBack)
    eager = _worker(model_dir, **CPU_WORKER)
    with caplog.at_level(logging.INFO):
        compiled = _worker(model_dir, compile="on", compile_cache_dir=str(kernel_cache), **CPU_WORKER)
        pipeline = compiled[0].pipeline
        assert pipeline.compiling is not None and pipeline.compiled is None
        items = [{"body": _png()}, {"image": _png((40, 90)), "cam_classes": "top2"}, {"body": b"not an image"}]
        want = _batch(*eager, items)
        for _ in range(3):  # the eager engine, while the compiled one waits: the very same answers
            assert _batch(*compiled, items) == want
        go.set()
        while pipeline.compiling.is_alive():  # batches keep coming while it compiles, and at the switch
            status, _ = _batch(*compiled, items)
            assert status == want[0]
        pipeline.compiling.join(600)
    assert pipeline.compiled is not None and pipeline.compiled.active
    assert "switched to the compiled model" in caplog.text
    _answers_as_eager_in_batches_of_1_to_4(eager, compiled)


def test_a_worker_that_cannot_compile_serves_eager_after_one_warning(model_dir, tmp_path, caplog):  # noqa: F811
    # No C++ compiler for inductor's CPU kernels, and an empty cache: compiling must fail.
    import torch._inductor.config as inductor_config

    # The config's own patch, not monkeypatch: monkeypatch's undo deletes the key from inductor's
    # config proxy, and every later compile in the process fails ("cpp.cxx does not exist").
    torch._dynamo.reset()
    with inductor_config.patch({"cpp.cxx": (None, str(tmp_path / "no-such-compiler"))}):
        service, context = _compiled_handler(model_dir, caplog, compile_cache_dir=str(tmp_path / "empty-cache"))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "torch.compile failed" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    assert service.pipeline.compiled is None
    assert not isinstance(service.pipeline.engine.model, torch._dynamo.eval_frame.OptimizedModule)
    assert service.pipeline.engine.batch_buckets is None
    eager, eager_context = _handler(model_dir)
    statuses, bodies = _batch(service, context, [{"body": _png()}, {"body": _png((40, 90))}])
    _, want = _batch(eager, eager_context, [{"body": _png()}, {"body": _png((40, 90))}])
    assert statuses == [200, 200]
    assert json.dumps([b["predictions"] for b in bodies]) == json.dumps([w["predictions"] for w in want])
    torch._dynamo.reset()


def test_the_archiver_resolves_auto_by_timing_and_writes_down_what_it_measured(weights, tmp_path):
    """--compile, --channels-last and --compile-freeze auto: the archive records the measured
    images/s and map differences of every option, and the choice follows from them (correct, and
    at least 5% faster; frozen only where 5% faster than the best unfrozen)."""
    import yaml
    from conftest import DATA, run_archiver

    done = run_archiver("--export-path", str(tmp_path), "--name", "tiny_auto", "--compile", "auto",
                        "--channels-last", "auto", "--compile-cache-dir", str(tmp_path / "inductor"),
                        "--model", f"{DATA / 'tinynet' / 'model.py'}:TinyNet", "--num-classes", "3",
                        "--weights", str(weights["tinynet"]), "--input-size", "64", "--batch-size", "4",
                        check=True)
    assert "timing channels_last and torch.compile at batch 4 on this machine's cpu" in done.stderr
    with __import__("zipfile").ZipFile(tmp_path / "tiny_auto.mar") as mar:
        config = yaml.safe_load(mar.read("model-config.yaml"))
    handler = config["handler"]
    tuning = handler["tuning"]
    speed, diff = tuning["images_per_s"], tuning["max_map_difference"]
    assert tuning["device"] == "cpu" and tuning["batch"] == 4
    every = {"compiled": ("off", "off"), "compiled_frozen": ("off", "on"),
             "compiled_channels_last": ("on", "off"), "compiled_channels_last_frozen": ("on", "on")}
    # Compiled in one layout only, frozen and not: the eager layout that the quick first timing
    # found faster (the log line names it).
    compiled_options = {k: v for k, v in every.items() if k in speed}
    (layout,) = {v[0] for v in compiled_options.values()}
    assert sorted(f for _, f in compiled_options.values()) == ["off", "on"]
    assert f"compiling {'channels-last' if layout == 'on' else 'NCHW'}" in done.stderr
    assert set(speed) == {"eager", "channels_last", *compiled_options} and all(v > 0 for v in speed.values())
    assert all(diff[key] < 1e-4 for key in compiled_options)  # every compiled option is correct here
    channels_last = diff["channels_last"] <= 1e-4 and speed["channels_last"] >= 1.05 * speed["eager"]
    base = speed["channels_last" if channels_last else "eager"]
    fits = {key: speed[key] for key in compiled_options if speed[key] >= 1.05 * base}
    unfrozen = max((k for k in fits if not k.endswith("_frozen")), key=fits.get, default=None)
    frozen = max((k for k in fits if k.endswith("_frozen")), key=fits.get, default=None)
    best = frozen if frozen and (unfrozen is None or fits[frozen] >= 1.05 * fits[unfrozen]) else unfrozen
    if best:
        want = ("on", *compiled_options[best])
    else:
        want = ("off", "on" if channels_last else "off", "off")
    assert (handler["compile"], handler["channels_last"], handler["compile_freeze"]) == want
    assert tuning["chosen"] == {"channels_last": handler["channels_last"], "compile": handler["compile"],
                                "compile_freeze": handler["compile_freeze"]}
    assert config["startupTimeout"] == (600 if best else 120)
    assert (f"compile {handler['compile']}, channels_last {handler['channels_last']}, "
            f"compile_freeze {handler['compile_freeze']}") in done.stderr


@pytest.mark.server
def test_a_compiled_archive_serves_the_same_answers_on_a_real_server(server, weights, tmp_path,
                                                                    kernel_cache):  # noqa: F811
    """TinyNet archived with --compile on and served by a real TorchServe next to the session's
    eager TinyNet: same classes and maps, every batch size from graphs compiled at load. (The
    default model's compiled maps are checked in-process in tests/test_compiled.py; compiling its
    four batch buckets takes minutes on a 2-core CI machine.) Batches of up to 4 (buckets 1/2/4), in the
    module's kernel cache: the in-process workers above compiled these graphs (channels-last,
    frozen and not), and the worker's load finds them there as a restarted worker would."""
    from concurrent.futures import ThreadPoolExecutor

    import yaml
    from conftest import DATA, run_archiver

    from devkit.tslocal import LocalServer

    store = tmp_path / "store"
    run_archiver("-q", "--export-path", str(store), "--name", "tinynet_compiled", "--compile", "on",
                 "--compile-start", "load", "--channels-last", "on", "--compile-cache-dir", str(kernel_cache),
                 "--model", f"{DATA / 'tinynet' / 'model.py'}:TinyNet", "--num-classes", "3",
                 "--weights", str(weights["tinynet"]), "--labels", str(DATA / "tinynet" / "index_to_name.json"),
                 "--input-size", "64", "--batch-size", "4", check=True)
    with __import__("zipfile").ZipFile(store / "tinynet_compiled.mar") as mar:
        config = yaml.safe_load(mar.read("model-config.yaml"))
    handler = config["handler"]
    assert config["startupTimeout"] == 600 and handler["compile"] == "on" and handler["channels_last"] == "on"
    # compile and layout given, freezing left to the archiver: it timed both, and chose
    speeds = handler["tuning"]["images_per_s"]
    assert set(speeds) == {"eager", "compiled_channels_last", "compiled_channels_last_frozen"}
    frozen = speeds["compiled_channels_last_frozen"] >= 1.05 * speeds["compiled_channels_last"]
    assert handler["compile_freeze"] == ("on" if frozen else "off")
    images = [_png(), _png((40, 90)), _png((120, 60), (20, 200, 20))]
    with LocalServer(store, ["tinynet_compiled.mar"], tmp_path / "server") as compiled:
        log = (compiled.workdir / "logs" / "model_log.log").read_text()
        assert "for batch sizes 1/2/4 " in log and "torch.compile failed" not in log
        for image in images:
            fields = {"cam_classes": "top2", "outputs": "map", "cam_method": "xgradcam"}
            want = server.predict("tinynet", files={"image": ("x.png", image)}, data=fields).json()
            got = compiled.predict("tinynet_compiled", files={"image": ("x.png", image)}, data=fields).json()
            assert [p["class_id"] for p in got["predictions"]] == [p["class_id"] for p in want["predictions"]]
            for g, w in zip(got["cams"], want["cams"], strict=True):
                np.testing.assert_allclose(g["map"], w["map"], atol=2e-3)
        with ThreadPoolExecutor(11) as pool:  # batches of several sizes
            answers = list(pool.map(lambda i: compiled.predict(
                "tinynet_compiled", files={"image": ("x.png", images[i % 3])}), range(11)))
        assert [r.status_code for r in answers] == [200] * 11
        assert max(r.json()["batch_size"] for r in answers) > 1
        log = (compiled.workdir / "logs" / "model_log.log").read_text()
        assert "new graph(s) after load" not in log and "torch.compile failed" not in log


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_gpu_worker_with_cuda_graphs_answers_as_the_eager_gpu_worker(model_dir, tmp_path, caplog,  # noqa: F811
                                                                       monkeypatch):
    """The configuration the README recommends for GPU workers (compile on, reduce-overhead):
    every bucket recorded in initialize, then batches of 1..4 answered as the eager GPU worker
    answers them, with nothing compiled after load. (Not yet run on a GPU when written.)"""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    eager = _handler(model_dir, gpu=0)
    service, context = _compiled_handler(model_dir, caplog, gpu=0, compile_mode="reduce-overhead",
                                         compile_cache_dir=str(tmp_path / "inductor"))
    assert service.device == torch.device("cuda:0")
    assert service.pipeline.compiled is not None and service.pipeline.compiled.sizes == (1, 2, 4, 8)
    assert "reduce-overhead" in caplog.text
    frames_after_load = counters["stats"]["unique_graphs"]
    for _ in range(2):  # CUDA graphs replay from the second call of a bucket on
        _answers_as_eager_in_batches_of_1_to_4(eager, (service, context))
    assert counters["stats"]["unique_graphs"] == frames_after_load, "a batch size compiled after load"
    assert "new graph(s) after load" not in caplog.text
