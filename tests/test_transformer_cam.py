"""Tests of handler.attention_cam: Chefer et al.'s maps on timm ViT, DeiT, register-token and Eva
models against a straightforward unbatched reference (per image, per class), torchvision's ViT
against its timm twin (the same weights in timm's VisionTransformer), the batch split that keeps
fused attention for every other request, the compiled path left untouched, and the 400s (CNN,
attention that cannot be read, unknown method) through the pipeline's own error path. No server."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from support.attention import chefer_reference, legrad_reference, timm_twin
from support.families import randomize, save_weights
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

from handler.attention_cam import LEGRAD_BLOCKS, attention_explainer, batch_pass
from handler.cam import CamEngine
from handler.pipeline import Archive, Pipeline
from handler.requests import RawRequest
from handler.vocab import ATTENTION_METHODS

SIZE = 32
TINY = dict(img_size=SIZE, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
MODELS = {
    "vit": (lambda: VisionTransformer(**TINY), "token"),
    "deit_distilled": (lambda: VisionTransformerDistilled(**TINY), "distilled"),
    "vit_reg_avg": (lambda: VisionTransformer(**TINY, reg_tokens=2, global_pool="avg"), "avg"),
    "eva_rope": (lambda: Eva(**TINY, use_rot_pos_emb=True, global_pool="token"), "token"),
}


def _model(key: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize(MODELS[key][0]().eval(), (SIZE, SIZE), seed)


def _engine(model: torch.nn.Module, **kwargs) -> CamEngine:
    return CamEngine(model, input_size=(SIZE, SIZE), **kwargs)


@pytest.mark.parametrize("batched", [True, False], ids=["vmapped", "per_round"])
@pytest.mark.parametrize("key", list(MODELS))
def test_chefer_equals_an_unbatched_reference(key, batched):
    model = _model(key).double()  # fp64: the maps' spread over the patches is small at random weights
    engine = _engine(model, batched_targets=batched)
    explainer, why = attention_explainer(engine)
    assert explainer is not None, why
    x = torch.randn((3, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rows, classes = [0, 1, 0, 2, 1], [4, 0, 1, 3, 2]  # two rounds of classes
    maps = batch_pass(engine, explainer, x, ["chefer"] * 3).cams(rows, torch.tensor(classes), ["chefer"] * 5)
    assert maps.shape == (5, 4, 4)
    for p, (r, c) in enumerate(zip(rows, classes, strict=True)):
        ref = chefer_reference(model, x[r], c, MODELS[key][1]).detach()
        spread = float(ref.amax() - ref.amin())  # what the served, min-max-scaled map shows
        assert spread > 1e-6, "the reference map is constant: the comparison would be vacuous"
        torch.testing.assert_close(maps[p], ref, atol=1e-6 * spread, rtol=0)
    # Fused attention is back on; no hook is left; no parameter got a gradient.
    assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("batched", [True, False], ids=["vmapped", "per_round"])
@pytest.mark.parametrize("key", list(MODELS))
def test_legrad_equals_an_unbatched_reference(key, batched):
    model = _model(key).double()
    engine = _engine(model, batched_targets=batched)
    explainer, why = attention_explainer(engine)
    assert explainer is not None, why
    x = torch.randn((3, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rows, classes = [0, 1, 0, 2, 1], [4, 0, 1, 3, 2]
    # chefer and legrad targets in one pass: each map by its own method.
    methods = ["legrad", "chefer", "chefer", "legrad", "legrad"]
    maps = batch_pass(engine, explainer, x, ["legrad", "chefer", "legrad"]).cams(rows, torch.tensor(classes), methods)
    for p, (r, c, m) in enumerate(zip(rows, classes, methods, strict=True)):
        ref = (legrad_reference(model, x[r], c) if m == "legrad" else
               chefer_reference(model, x[r], c, MODELS[key][1])).detach()
        spread = float(ref.amax() - ref.amin())
        assert spread > 1e-9, "the reference map is constant: the comparison would be vacuous"
        torch.testing.assert_close(maps[p], ref, atol=1e-6 * spread, rtol=0)
    assert not torch.allclose(maps[0], maps[2]), "legrad and chefer maps of one image must differ"
    assert all(not m._forward_hooks for m in model.modules())


def test_legrad_block_scores_are_the_heads_reading_of_each_block():
    """The last block's score is the logit itself; an earlier block's is the head on its tokens."""
    model = _model("vit")
    engine = _engine(model)
    explainer, _ = attention_explainer(engine)
    x = torch.randn((2, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(6))
    attention_pass = explainer.forward(engine, x, layer_scores=True)
    assert len(attention_pass.layer_scores) == LEGRAD_BLOCKS == len(model.blocks)  # the tiny ViT has 2
    torch.testing.assert_close(attention_pass.layer_scores[-1], attention_pass.logits, atol=1e-6, rtol=0)
    with torch.no_grad():
        tokens = model.blocks[0](model.norm_pre(model._pos_embed(model.patch_embed(x))))
        torch.testing.assert_close(attention_pass.layer_scores[0], model.forward_head(model.norm(tokens)),
                                   atol=1e-5, rtol=0)
    assert explainer.forward(engine, x).layer_scores is None  # only a pass with legrad rows makes them


class _Tempered(VisionTransformer):
    """A temperature after the head: its last block's score is no longer its logit."""

    def forward(self, x):
        return super().forward(x) / 2


def test_a_vit_whose_forward_is_not_its_head_on_the_last_block_keeps_chefer_and_refuses_legrad(tmp_path):
    torch.manual_seed(0)
    model = randomize(_Tempered(**TINY).eval(), (SIZE, SIZE))
    explainer, why = attention_explainer(_engine(model))
    assert explainer is not None, why
    assert list(explainer.refused) == ["legrad"]
    assert "the head of _Tempered is not its final norm, pooling and classifier" in explainer.refused["legrad"]
    # Through the pipeline: chefer answers, legrad gets a 400 that says why.
    import sys

    module = tmp_path / "tempered.py"
    module.write_text("from timm.models.vision_transformer import VisionTransformer\n\n\n"
                      "class Tempered(VisionTransformer):\n"
                      "    def forward(self, x):\n"
                      "        return super().forward(x) / 2\n")
    kwargs = {k: v for k, v in TINY.items() if k != "num_classes"}
    sys.modules.pop("tempered", None)
    pipeline = _pipeline(tmp_path / "tempered_vit", f"{module}:Tempered", model, kwargs)
    chefer, legrad = pipeline.run([RawRequest(_png(0), {"cam_method": m}, "json") for m in ("chefer", "legrad")])
    assert chefer.status == 200, chefer.text
    body = json.loads(legrad.text)
    assert legrad.status == 400 and body["field"] == "cam_method"
    assert "cam_method 'legrad' does not apply to this model: the head of Tempered" in body["message"]


def test_the_batch_split_keeps_fused_attention_for_the_other_rows(monkeypatch):
    model = _model("vit")
    engine = _engine(model)
    explainer, _ = attention_explainer(engine)
    fused_batches: list[int] = []
    unfused_batches: list[int] = []
    sdpa = F.scaled_dot_product_attention

    def _counting_sdpa(q, *args, **kwargs):
        fused_batches.append(q.shape[0])
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", _counting_sdpa)
    for block in model.blocks:
        block.attn.attn_drop.register_forward_hook(lambda _m, _i, out: unfused_batches.append(out.shape[0]))
    x = torch.randn((4, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(2))

    alone = batch_pass(engine, explainer, x[[0, 2]], ["gradcam", "gradcam++"])
    assert fused_batches == [2, 2] and unfused_batches == []  # the default path: fused, no probabilities
    fused_batches.clear()
    mixed = batch_pass(engine, explainer, x, ["gradcam", "chefer", "gradcam++", "chefer"])
    assert fused_batches == [2, 2], "the Grad-CAM rows run fused, in a pass of their own"
    assert unfused_batches == [2, 2], "only the chefer rows materialise attention probabilities"
    torch.testing.assert_close(mixed.logits[[0, 2]], alone.logits.detach(), atol=0, rtol=0)
    classes = torch.tensor([1, 3, 2, 4])
    got = mixed.cams([0, 1, 2, 3], classes, ["gradcam", "chefer", "gradcam++", "chefer"])
    want = alone.cams([0, 1], classes[[0, 2]], ["gradcam", "gradcam++"])
    torch.testing.assert_close(got[[0, 2]], want, atol=0, rtol=0)
    chefer_only = batch_pass(engine, explainer, x[[1, 3]], ["chefer", "chefer"]).cams([0, 1], classes[[1, 3]],
                                                                                    ["chefer", "chefer"])
    torch.testing.assert_close(got[[1, 3]], chefer_only, atol=1e-6, rtol=1e-5)


def test_the_compiled_graphs_neither_break_nor_recompile():
    from handler.compiled import CompiledPass, _graph_count

    model = _model("vit")
    engine = _engine(model)
    explainer, _ = attention_explainer(engine)
    x = torch.randn((2, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(3))
    want = batch_pass(engine, explainer, x, ["chefer", "chefer"]).cams([0, 1], torch.tensor([0, 1]), ["chefer"] * 2)
    eager_gradcam = engine.cams(engine.forward(x), [0, 1], torch.tensor([0, 1]), ["gradcam"] * 2)
    compiled = CompiledPass(engine, batch_size=2, backend="eager")
    engine.batched_targets = False  # as Pipeline._compile does
    compiled.warm_up(lambda n: engine.cams(engine.forward(x[:n]), list(range(n)), torch.arange(n), ["gradcam"] * n))
    assert compiled.active
    graphs = _graph_count()
    mixed = batch_pass(engine, explainer, x, ["gradcam", "chefer"])
    got = mixed.cams([0, 1], torch.tensor([0, 1]), ["gradcam", "chefer"])
    again = engine.cams(engine.forward(x), [0, 1], torch.tensor([0, 1]), ["gradcam"] * 2)
    assert _graph_count() == graphs, "a chefer pass made the compiled model compile again"
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(again, eager_gradcam, atol=1e-6, rtol=1e-5)
    assert engine.capture is not None and not engine.capture.passthrough


# --------------------------------------------------------------------------- through the pipeline


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _pipeline(folder, source: str, model: torch.nn.Module, kwargs: dict, **handler) -> Pipeline:
    folder.mkdir()
    save_weights(model, folder / "model.safetensors")
    config = {"model": source, "num_classes": 5, "model_kwargs": kwargs, "labels": "",
              "input_size": [SIZE, SIZE], **handler}
    return Pipeline(Archive(folder, folder.name, handler=config, batch_size=4))


@pytest.fixture(scope="module")
def vit_pipeline(tmp_path_factory):
    kwargs = {k: v for k, v in TINY.items() if k != "num_classes"}
    model = randomize(VisionTransformer(**TINY).eval(), (SIZE, SIZE))
    return _pipeline(tmp_path_factory.mktemp("p") / "tiny_vit", "timm:vit_tiny_patch16_224", model, kwargs)


def _answers(pipeline: Pipeline, methods: list[str]) -> list[dict]:
    requests = [RawRequest(_png(i), {"cam_method": m, "cam_classes": "top2", "outputs": "map,heatmap"}, "json")
                for i, m in enumerate(methods)]
    out = []
    for answer in pipeline.run(requests):
        body = json.loads(answer.text)
        body.pop("batch_size", None)
        out.append({"status": answer.status, **body})
    return out


def test_other_answers_are_identical_whether_or_not_attention_requests_share_the_batch(vit_pipeline):
    alone = _answers(vit_pipeline, ["gradcam", "xgradcam"])
    mixed = _answers(vit_pipeline, ["gradcam", "xgradcam", "chefer", "legrad"])
    assert alone == mixed[:2]
    for answer, method in zip(mixed[2:], ATTENTION_METHODS, strict=True):
        assert answer["status"] == 200 and [c["method"] for c in answer["cams"]] == [method, method]
        grid = np.array(answer["cams"][0]["map"])
        assert grid.shape == (4, 4) and grid.max() == 1.0 and grid.min() == 0.0
    # The legrad answer is the same without the chefer request beside it (photos go by position).
    assert _answers(vit_pipeline, ["gradcam", "xgradcam", "gradcam", "legrad"])[3] == mixed[3]
    assert all(m.fused_attn for m in vit_pipeline.engine.model.modules() if hasattr(m, "fused_attn"))


def test_an_unknown_method_gets_a_400_that_lists_chefer(vit_pipeline):
    (answer,) = vit_pipeline.run([RawRequest(_png(0), {"cam_method": "rollout"}, "json")])
    body = json.loads(answer.text)
    assert answer.status == 400 and body["field"] == "cam_method"
    assert all(m in body["message"] for m in ("gradcam", "hirescam", *ATTENTION_METHODS))


def test_a_cnn_refuses_chefer_with_a_400_that_says_why(tmp_path):
    from conftest import DATA
    from support.tinynet import tinynet_class

    torch.manual_seed(0)
    source = f"{DATA / 'tinynet' / 'model.py'}:TinyNet"
    pipeline = _pipeline(tmp_path / "cnn", source, tinynet_class()(num_classes=5).eval(), {})
    folder, config = pipeline.archive.model_dir, pipeline.archive.handler
    bad, good = pipeline.run([RawRequest(_png(0), {"cam_method": "chefer"}, "json"),
                              RawRequest(_png(1), {"cam_method": "gradcam"}, "json")])
    body = json.loads(bad.text)
    assert bad.status == 400 and body["field"] == "cam_method"
    assert "does not apply to this model" in body["message"] and "TinyNet" in body["message"]
    assert "attention" in body["message"]
    assert good.status == 200
    with pytest.raises(ValueError, match="cam_method"):
        Pipeline(Archive(folder, "cnn", handler={**config, "cam_method": "chefer"}, batch_size=2))


# --------------------------------------------------------------------------- torchvision's ViT


def _tv_vit(seed: int = 0, dtype=torch.float64) -> torch.nn.Module:
    from torchvision.models import VisionTransformer as TorchvisionViT

    torch.manual_seed(seed)
    model = TorchvisionViT(image_size=SIZE, patch_size=8, num_layers=3, num_heads=4, hidden_dim=32, mlp_dim=64,
                           num_classes=5).eval()
    return randomize(model, (SIZE, SIZE), seed).to(dtype)


def _tv_engine(model: torch.nn.Module, **kwargs) -> CamEngine:
    return CamEngine(model, "encoder.layers.encoder_layer_2.ln_1", input_size=(SIZE, SIZE), **kwargs)


@pytest.mark.parametrize("batched", [True, False], ids=["vmapped", "per_round"])
def test_torchvision_vit_chefer_and_legrad_equal_its_timm_twins(batched):
    model = _tv_vit()
    twin = timm_twin(model)
    x = torch.randn((3, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin(x), atol=1e-12, rtol=0)  # the twin is the same function
    engine = _tv_engine(model, batched_targets=batched)
    explainer, why = attention_explainer(engine)
    assert explainer is not None, why
    assert explainer.plan.kind == "torchvision" and explainer.plan.prefix == 1 and explainer.grid == (4, 4)
    rows, classes = [0, 1, 2, 0, 1], [4, 0, 1, 3, 2]
    methods = ["chefer", "legrad", "chefer", "legrad", "chefer"]
    maps = batch_pass(engine, explainer, x, ["chefer", "legrad", "chefer"]).cams(rows, torch.tensor(classes), methods)
    for p, (r, c, m) in enumerate(zip(rows, classes, methods, strict=True)):
        ref = (chefer_reference(twin, x[r], c) if m == "chefer" else legrad_reference(twin, x[r], c)).detach()
        spread = float(ref.amax() - ref.amin())
        assert spread > 1e-6, "the reference map is constant: the comparison would be vacuous"
        torch.testing.assert_close(maps[p], ref, atol=1e-6 * spread, rtol=0)
    # The modules' own forward is back (none left on the instances), no hook, no gradient.
    attention = [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert len(attention) == 3 and all("forward" not in m.__dict__ for m in attention)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_torchvision_vit_other_rows_keep_the_models_own_attention(monkeypatch):
    from handler import attention_cam

    model = _tv_vit(dtype=torch.float32)
    engine = _tv_engine(model)
    explainer, why = attention_explainer(engine)
    assert explainer is not None, why
    explicit: list[int] = []
    original = attention_cam._explicit_attention

    def _counting(module, store, query, *args, **kwargs):
        explicit.append(query.shape[0])
        return original(module, store, query, *args, **kwargs)

    monkeypatch.setattr(attention_cam, "_explicit_attention", _counting)
    x = torch.randn((4, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(5))
    alone = batch_pass(engine, explainer, x[[0, 2]], ["gradcam", "layercam"])
    assert explicit == []
    mixed = batch_pass(engine, explainer, x, ["gradcam", "chefer", "layercam", "chefer"])
    assert explicit == [2, 2, 2], "only the two chefer rows run the explicit path, once per layer"
    torch.testing.assert_close(mixed.logits[[0, 2]], alone.logits.detach(), atol=0, rtol=0)
    classes = torch.tensor([1, 3, 2, 4])
    got = mixed.cams([0, 1, 2, 3], classes, ["gradcam", "chefer", "layercam", "chefer"])
    want = alone.cams([0, 1], classes[[0, 2]], ["gradcam", "layercam"])
    torch.testing.assert_close(got[[0, 2]], want, atol=0, rtol=0)


def _refused(mutate) -> str:
    model = _tv_vit(dtype=torch.float32)
    mutate(model)
    explainer, why = attention_explainer(_tv_engine(model))
    assert explainer is None
    return why


def test_torchvision_vit_attention_that_cannot_be_read_is_refused_and_says_why():
    def zero_slot(model):
        model.encoder.layers[1].self_attention.add_zero_attn = True

    assert "encoder layer 1" in _refused(zero_slot) and "zero attention slot" in _refused(zero_slot)

    class Tempered(torch.nn.MultiheadAttention):
        """An attention subclass of its own: a sharper softmax the explicit path would not copy."""

        def forward(self, query, key, value, **kwargs):
            return super().forward(query * 2, key, value, **kwargs)

    def tempered(model):
        old = model.encoder.layers[0].self_attention
        new = Tempered(old.embed_dim, old.num_heads, batch_first=True)
        new.load_state_dict(old.state_dict())
        model.encoder.layers[0].self_attention = new.eval()

    assert "changes the logits" in _refused(tempered)


def test_torchvision_vit_at_its_real_layout_answers_chefer_through_the_pipeline(tmp_path):
    from conftest import DATA
    from support.families import Family

    family = Family("tv_vit", f"{DATA / 'tvvit' / 'model.py'}:SmallViT", {"num_classes": 5, "image_size": 64})
    model = family.build()
    folder = tmp_path / "tv_vit"
    folder.mkdir()
    save_weights(model, folder / "model.safetensors")
    config = {"model": family.source, "num_classes": 5, "model_kwargs": {"image_size": 64}, "labels": "",
              "input_size": [64, 64]}
    pipeline = Pipeline(Archive(folder, "tv_vit", handler=config, batch_size=4))
    assert pipeline.attention is not None, pipeline.attention_refusal
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    chefer, gradcam = pipeline.run([RawRequest(buffer.getvalue(), {"cam_method": m, "cam_classes": "top2"}, "json")
                                    for m in ("chefer", "gradcam")])
    assert chefer.status == 200 and gradcam.status == 200, chefer.text
    body = json.loads(chefer.text)
    assert [c["method"] for c in body["cams"]] == ["chefer", "chefer"] and body["grid_size"] == [4, 4]
    x = pipeline.engine.prepare(torch.from_numpy(pixels)[None]).double()
    twin = timm_twin(model.double())
    for cam in body["cams"]:
        ref = chefer_reference(twin, x[0], cam["class_id"]).detach()
        ref = (ref - ref.amin()) / (ref.amax() - ref.amin())
        np.testing.assert_allclose(np.array(cam["map"]), ref.numpy(), atol=6e-4)  # 3 decimals in the answer
