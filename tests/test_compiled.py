"""The compiled serve path: maps equal the eager engine's, every batch size served without a
recompile after load, and a worker that cannot compile serves eager.

Compiling costs seconds per graph on a CPU (a C++ build each): each test compiles only the batch
sizes it uses, at a small input size, with small models where the architecture's size proves
nothing. The tests share one inductor cache in a temporary folder (:func:`kernel_cache`, never the
user's ~/.cache), so a graph that several tests compile alike (TinyNet at 64 px in the handler,
the archiver and TorchServe) is built once; the tests about the cache itself use fresh folders.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA, ROOT, run_archiver
from support.tinynet import tinynet_class
from test_cam import _calibrated
from test_handler import _batch, _handler, _png, model_dir  # noqa: F401 (fixture)

from handler.cam import METHODS, CamEngine, normalize_maps
from handler.compiled import CompiledPass

# Every test here compiles: `make test-fast` leaves them out (-m "not compile").
pytestmark = pytest.mark.compile

SIZE = 96


@pytest.fixture(scope="module", autouse=True)
def kernel_cache(tmp_path_factory):
    """The inductor cache of every compile in this module, in-process and in the processes it
    starts (archiver, TorchServe and its workers inherit the environment): a fresh temporary
    folder, the default one (``$XDG_CACHE_HOME/gradcam-serve/inductor``) as well as inductor's.
    Restored afterwards: CompiledPass sets TORCHINDUCTOR_CACHE_DIR for its process."""
    home = tmp_path_factory.mktemp("xdg_cache")
    folder = home / "gradcam-serve" / "inductor"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(home))
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(folder))
        yield folder


def _model(arch: str, x: torch.Tensor) -> torch.nn.Module:
    """A seeded model, its batch norms calibrated on ``x``. ``resnet10`` and ``mobilenet_v2_short``
    are resnet18 and mobilenet_v2 with fewer of the same blocks (one BasicBlock per stage; four
    inverted-residual stages, depthwise convolutions and the 1280-channel last conv kept):
    inductor on a CPU spends seconds per block compiling, and the maps' equality with eager does
    not depend on the depth."""
    import timm
    import torchvision

    torch.manual_seed(0)
    if arch.startswith("timm:"):
        model = timm.create_model(arch[5:], pretrained=False, num_classes=20)
    elif arch == "resnet10":
        from torchvision.models.resnet import BasicBlock, ResNet

        model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=20)
    elif arch == "mobilenet_v2_short":
        model = torchvision.models.mobilenet_v2(weights=None, num_classes=20, inverted_residual_setting=[
            [1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 2, 2], [6, 64, 1, 2]])
    else:
        model = torchvision.models.get_model(arch, weights=None, num_classes=20)
    return _calibrated(model, x)


def _classes(model, x, rows):
    """Each image's best classes in turn: its first target is its top class, the next its second..."""
    with torch.no_grad():
        ranked = model(x).argsort(dim=1, descending=True)
    return torch.tensor([int(ranked[r, rows[:i].count(r)]) for i, r in enumerate(rows)])


def test_compiled_maps_of_the_default_model_on_photos_equal_eager_within_1e_5():
    """The served model with its real weights, the test photos, each photo's best two or three
    classes under all five methods."""
    from PIL import Image
    from test_cam import DATA, _pretrained_lite0

    from handler.images import image_pixels

    model = _pretrained_lite0()
    photos = [Image.open(DATA / name).convert("RGB") for name in ("chelsea.jpg", "coffee.jpg", "astronaut.jpg")]
    pixels = torch.from_numpy(np.stack([image_pixels(p, (224, 224), Image.Resampling.BICUBIC) for p in photos]))
    kwargs = {"mean": (0.5,) * 3, "std": (0.5,) * 3, "batched_targets": False}
    eager = CamEngine(copy.deepcopy(model), "bn2", **kwargs)
    compiled = CamEngine(copy.deepcopy(model), "bn2", **kwargs)
    CompiledPass(compiled, batch_size=4, freeze=True)
    x = eager.prepare(pixels)
    rows = [0, 0, 1, 1, 2, 2, 2]
    classes = _classes(eager.model, x, rows)
    assert classes[0] == 285 and classes[2] == 967  # Egyptian cat, espresso
    methods = [METHODS[i % len(METHODS)] for i in range(len(rows))]
    want = normalize_maps(eager.cams(eager.forward(x), rows, classes, methods))
    got = normalize_maps(compiled.cams(compiled.forward(x), rows, classes, methods))
    assert float(want.amax()) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch, layer, batch_mode, freeze", [
    ("resnet10", "layer4", "buckets", True), ("mobilenet_v2_short", "features", "dynamic", True),
    ("resnet10", "layer4", "buckets", False),
])
def test_compiled_maps_equal_eager_for_every_method_and_several_classes(arch, layer, batch_mode, freeze):
    """Both passes are compared with the exact maps (the eager pass in float64). The compiled
    maps are within 1e-5 of them, or within twice the eager fp32 pass's own error where that is
    larger: fp32 rounding alone puts the eager maps up to ~5e-5 off where a map's channel sum
    cancels (mobilenet_v2), and two correct fp32 passes cannot agree more closely than that."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 3, SIZE, SIZE, generator=gen)
    model = _model(arch, x)
    eager = CamEngine(copy.deepcopy(model), layer, input_size=(SIZE, SIZE), batched_targets=False)
    exact = CamEngine(copy.deepcopy(model).double(), layer, input_size=(SIZE, SIZE), batched_targets=False)
    compiled = CamEngine(copy.deepcopy(model), layer, input_size=(SIZE, SIZE), batched_targets=False)
    compiled_pass = CompiledPass(compiled, batch_size=4, batch_mode=batch_mode, freeze=freeze)
    assert compiled_pass.frozen is freeze
    # Three images padded to a bucket of 4 (or a dynamic batch); each image's best two or three
    # classes, all five methods among them.
    rows = [0, 0, 1, 1, 2, 2, 2]
    classes = _classes(model, x, rows)
    methods = [METHODS[i % len(METHODS)] for i in range(len(rows))]
    got_pass = compiled.forward(x)
    assert got_pass.logits.shape == (3, 20)
    torch.testing.assert_close(got_pass.logits, eager.forward(x).logits, atol=1e-4, rtol=1e-4)
    got = normalize_maps(compiled.cams(got_pass, rows, classes, methods))
    want = normalize_maps(eager.cams(eager.forward(x), rows, classes, methods))
    truth = normalize_maps(exact.cams(exact.forward(x.double()), rows, classes, methods)).float()
    assert float(truth.amax()) == pytest.approx(1.0, abs=1e-6)  # not vacuous: real maps
    eager_error = float((want - truth).abs().max())
    assert eager_error < 1e-4  # the reference itself is sound
    compiled_error = float((got - truth).abs().max())
    assert compiled_error <= max(1e-5, 2 * eager_error), (compiled_error, eager_error)


@pytest.mark.parametrize("first", ["unfrozen", "frozen"])
def test_a_frozen_and_an_unfrozen_model_of_one_class_in_one_process_each_run_their_own_graphs(first):
    """Dynamo shares compiled frames between instances of one class compiled with equal options.
    The archiver times frozen and unfrozen copies of the model in one process, so a frozen model
    must compile (and run) frozen graphs of its own whichever was compiled first, and neither may
    run graphs that hold the other's weights: the two models here have different weights."""
    from torch._dynamo.utils import counters
    from torchvision.models.resnet import BasicBlock, ResNet

    # Three images in a bucket of 4, at the maps test's size: inductor's cache holds these graphs
    # from there (dynamo's frames, which this test is about, are per process and reset below).
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    models = {"unfrozen": _model("resnet10", x)}
    torch.manual_seed(1)
    models["frozen"] = _calibrated(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=20), x)
    order = [first, "frozen" if first == "unfrozen" else "unfrozen"]
    torch._dynamo.reset()  # no graphs of earlier tests' ResNets
    passes = {}
    for name in order:
        engine = CamEngine(copy.deepcopy(models[name]), "layer4", input_size=(SIZE, SIZE), batched_targets=False)
        CompiledPass(engine, batch_size=4, freeze=name == "frozen")
        folded = counters["inductor"]["binary_folding_conv"]
        graphs = counters["stats"]["unique_graphs"]
        passes[name] = engine.forward(x)
        # Frozen graphs hold their model's weights: a frozen model compiles its own. An unfrozen
        # model may share unfrozen graphs (weights are their inputs), never frozen ones.
        if name == "frozen":
            assert counters["stats"]["unique_graphs"] > graphs, "the frozen model compiled no graph of its own"
        # Freezing folds the batch norms into the convolutions (before inductor's cache lookup,
        # so also when the graph comes from the cache).
        grew = counters["inductor"]["binary_folding_conv"] > folded
        assert grew == (name == "frozen"), f"the {name} model's batch norms folded: {grew}"
    for name, model in models.items():
        want = CamEngine(copy.deepcopy(model), "layer4", input_size=(SIZE, SIZE)).forward(x).logits
        torch.testing.assert_close(passes[name].logits, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("key", ["vit", "swin"])
def test_compiled_maps_of_token_and_channels_last_layouts_equal_eager(key):
    """A class-token ViT (its target layer nested in blocks: LeafCapture stands in for the hook
    that compile would not run) and a Swin (NHWC): every method, several classes per image."""
    from support.families import BY_KEY, _photos

    family = BY_KEY[key]
    if key == "vit":  # two blocks, not twelve: the class token and the nested layer are the same
        family = dataclasses.replace(family, kwargs={"depth": 2}, layer="blocks.1.norm1")
    model = family.build()
    x = _photos(family.size)[:3]
    eager = CamEngine(copy.deepcopy(model), "auto", input_size=family.size, batched_targets=False)
    exact = CamEngine(copy.deepcopy(model).double(), family.layer, input_size=family.size, batched_targets=False,
                      layout=family.layout, prefix_tokens=family.prefix, grid=family.grid)
    compiled = CamEngine(copy.deepcopy(model), "auto", input_size=family.size, batched_targets=False)
    assert eager.target_layer == compiled.target_layer == family.layer
    CompiledPass(compiled, batch_size=4, freeze=key == "swin")  # the ViT's backbone unfrozen, the Swin's frozen
    rows = [0, 0, 1, 1, 2, 2, 2]
    classes = _classes(model, x, rows)
    methods = [METHODS[i % len(METHODS)] for i in range(len(rows))]
    got_pass = compiled.forward(x)
    got = normalize_maps(compiled.cams(got_pass, rows, classes, methods))
    want = normalize_maps(eager.cams(eager.forward(x), rows, classes, methods))
    truth = normalize_maps(exact.cams(exact.forward(x.double()), rows, classes, methods)).float()
    assert tuple(got.shape[1:]) == family.grid and float(truth.amax()) > 0.99  # real maps
    eager_error = float((want - truth).abs().max())
    compiled_error = float((got - truth).abs().max())
    assert eager_error < 1e-3
    assert compiled_error <= max(1e-5, 2 * eager_error), (compiled_error, eager_error)


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
def test_a_compiled_archive_serves_the_same_answers_on_a_real_server(server, weights, tmp_path, kernel_cache):
    """TinyNet archived with --compile on and served by a real TorchServe next to the session's
    eager TinyNet: same classes and maps, every batch size from graphs compiled at load. (The
    default model's compiled maps are checked in-process above; compiling its four batch
    buckets takes minutes on a 2-core CI machine.) Batches of up to 4 (buckets 1/2/4), in the
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
@pytest.mark.parametrize("mode", ["", "reduce-overhead"])
def test_on_a_gpu_compiled_maps_equal_eager(mode, monkeypatch):
    """inductor's CUDA kernels (and CUDA graphs with reduce-overhead): the maps of every method
    and several classes per image equal the eager pass's on the same device (TF32 off: it alone
    moves maps by ~1e-3)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 3, SIZE, SIZE, generator=gen)
    model = _model("resnet18", x)
    cuda = torch.device("cuda:0")
    eager = CamEngine(copy.deepcopy(model), "layer4", device=cuda, input_size=(SIZE, SIZE), batched_targets=False)
    compiled = CamEngine(copy.deepcopy(model), "layer4", device=cuda, input_size=(SIZE, SIZE),
                         batched_targets=False, channels_last=True)
    CompiledPass(compiled, batch_size=4, mode=mode or None)
    rows = [0, 0, 1, 1, 2, 2, 2]
    classes = _classes(model, x, rows).to(cuda)
    methods = [METHODS[i % len(METHODS)] for i in range(len(rows))]
    xd = x.to(cuda)
    for _ in range(3):  # CUDA graphs record on a later call than the first
        got = normalize_maps(compiled.cams(compiled.forward(xd.contiguous(memory_format=torch.channels_last)),
                                           rows, classes, methods))
    want = normalize_maps(eager.cams(eager.forward(xd), rows, classes, methods))
    assert float(want.amax()) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


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
