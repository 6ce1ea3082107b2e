"""Tests of handler.layouts and the engine on every layout: the views, layout detection and its
refusals, the picker on each model family (never an Identity, an attention internal or a layer
with zero patch gradient), maps equal to pytorch-grad-cam's with the matching
``reshape_transform`` for all five methods and several classes per image, bf16 on the CPU, and
the archiver's refusal of degenerate layers."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from support.archiver_main import run_main
from support.families import BY_KEY, FAMILIES, Family, pgc_maps
from torch import nn

from handler.cam import METHODS, CamEngine, compute_cams, normalize_maps
from handler.config import ServeConfig
from handler.layouts import (
    Layout,
    LayoutSpec,
    ModelHints,
    auto_target,
    classify,
    infer_layout,
    list_layers,
    probe_layers,
)

# --------------------------------------------------------------------------- views


def test_to_nchw_views_of_each_layout():
    gen = torch.Generator().manual_seed(0)
    nchw = torch.randn(2, 5, 3, 4, generator=gen)  # (N, C, h, w) reference
    nhwc = nchw.permute(0, 2, 3, 1).contiguous()
    tokens = nhwc.flatten(1, 2)  # (N, h*w, C), raster order
    prefix = torch.randn(2, 2, 5, generator=gen)
    nlc = torch.cat([prefix, tokens], dim=1)  # two prefix tokens in front
    cases = [(Layout("nchw", (3, 4)), nchw), (Layout("nhwc", (3, 4)), nhwc), (Layout("nlc", (3, 4), 2), nlc),
             (Layout("nlc", (3, 4), 0), tokens)]
    for layout, t in cases:
        out = layout.to_nchw(t)
        assert torch.equal(out, nchw), layout
        assert out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr(), "a view, not a copy"
        # Leading dimensions (rounds of gradients) pass through.
        assert torch.equal(layout.to_nchw(torch.stack([t, 2 * t])), torch.stack([nchw, 2 * nchw]))


def test_layout_describe_and_config():
    assert Layout("nlc", (14, 14), 1).describe() == "nlc 14x14 (+1 prefix token)"
    assert Layout("nhwc", (7, 7)).describe() == "nhwc 7x7"
    assert Layout("nlc", (16, 16), 5).to_config() == {"layout": "nlc", "prefix_tokens": 5, "grid": [16, 16]}
    assert Layout("nchw", (6, 8)).to_config() == {"layout": "nchw", "prefix_tokens": None, "grid": None}


def test_layout_spec_is_validated():
    with pytest.raises(ValueError, match="layout must be"):
        LayoutSpec("tokens")
    with pytest.raises(ValueError, match="prefix tokens must be an integer >= 0"):
        LayoutSpec("nlc", -1)
    with pytest.raises(ValueError, match="prefix tokens apply to the nlc layout"):
        LayoutSpec("nchw", 1)
    with pytest.raises(ValueError, match="grid must be two positive integers"):
        LayoutSpec("nlc", 1, (14,))


def test_serve_config_validates_layout_keys():
    config = ServeConfig.from_dict({"layout": "nlc", "prefix_tokens": 2, "grid": [14, 14]})
    assert (config.target.layout, config.target.prefix_tokens, config.target.grid) == ("nlc", 2, [14, 14])
    for bad, key in (({"layout": "tokens"}, "layout"), ({"prefix_tokens": -1}, "prefix_tokens"),
                     ({"layout": "nchw", "prefix_tokens": 1}, "prefix_tokens"), ({"grid": [7]}, "grid")):
        with pytest.raises(ValueError, match=f"handler config '{key}'"):
            ServeConfig.from_dict(bad)


# --------------------------------------------------------------------------- detection


def test_classify_shapes_at_224():
    vit = ModelHints((224, 224), prefix=1, token_grid=(14, 14))
    cnn = ModelHints((224, 224))
    swin = ModelHints((224, 224), output_fmt="NHWC")
    assert classify((2, 197, 192), 2, vit) == (Layout("nlc", (14, 14), 1), "")
    assert classify((2, 196, 192), 2, vit)[0] == Layout("nlc", (14, 14), 0)  # patch embedding, no prefix yet
    # The cases: a head-split attention tensor and a channels-last map are no NCHW maps.
    assert classify((2, 3, 197, 64), 2, vit) == (None, "not a map")
    assert classify((2, 7, 7, 768), 2, swin)[0] == Layout("nhwc", (7, 7))
    assert classify((2, 7, 7, 768), 2, cnn)[0] == Layout("nhwc", (7, 7))  # unambiguous by shape alone
    assert classify((2, 768, 7, 7), 2, swin)[0] == Layout("nchw", (7, 7))
    assert classify((2, 49, 768), 2, cnn)[0] == Layout("nlc", (7, 7), 0)  # LeViT, Swin's MLP tokens
    assert classify((128, 49, 96), 2, cnn) == (None, "not a map")  # Swin's windows: batch x windows
    assert classify((2, 1000), 2, cnn) == (None, "not a map")
    assert classify((2, 64, 1, 1), 2, cnn) == (None, "not a map")


def test_classify_non_square_inputs():
    hints = ModelHints((192, 256))
    assert classify((1, 512, 6, 8), 1, hints)[0] == Layout("nchw", (6, 8))
    assert classify((1, 512, 8, 6), 1, hints) == (None, "not a map")  # the aspect is the input's
    assert classify((1, 192, 64), 1, hints)[0] == Layout("nlc", (12, 16), 0)
    assert classify((1, 193, 64), 1, ModelHints((192, 256), prefix=1))[0] == Layout("nlc", (12, 16), 1)


def test_ambiguous_shapes_are_refused_with_what_to_pass():
    hints = ModelHints((64, 64))
    layout, why = classify((1, 8, 8, 8), 1, hints)
    assert layout is None and why.startswith("ambiguous") and "NCHW or NHWC" in why
    with pytest.raises(ValueError, match=r"reads as NCHW or NHWC: pass the layout: --layout nchw or --layout nhwc$"):
        infer_layout((1, 8, 8, 8), hints)
    assert infer_layout((1, 8, 8, 8), hints, LayoutSpec("nhwc")) == Layout("nhwc", (8, 8))
    assert infer_layout((1, 8, 8, 8), ModelHints((64, 64), output_fmt="NHWC")) == Layout("nhwc", (8, 8))
    # Two tokens fit a 1x2 and a 2x1 grid equally well.
    with pytest.raises(ValueError, match="2 tokens could be a 1x2 or 2x1 grid: pass the layout: --layout nlc "
                                         "--prefix-tokens 0 --grid 1 2 or --grid 2 1"):
        infer_layout((1, 2, 16), hints)
    assert infer_layout((1, 2, 16), hints, LayoutSpec("nlc", 0, (1, 2))) == Layout("nlc", (1, 2), 0)


def test_no_map_is_refused_with_the_expected_forms():
    hints = ModelHints((224, 224), prefix=1, token_grid=(14, 14))
    with pytest.raises(ValueError, match=r"outputs \(1, 3, 197, 64\), which is no map of a 224x224 input"):
        infer_layout((1, 3, 197, 64), hints)
    with pytest.raises(ValueError, match=r"no map as nlc"):
        infer_layout((1, 197, 192), hints, LayoutSpec("nlc", 3))


def test_model_hints_from_timm_and_torchvision():
    deit = BY_KEY["deit"].build()
    assert ModelHints.from_model(deit, (224, 224)).prefix == 2
    reg = ModelHints.from_model(BY_KEY["dinov2_reg"].build(), (224, 224))
    assert (reg.prefix, reg.token_grid) == (5, (16, 16))
    tv = ModelHints.from_model(BY_KEY["tv_vit"].build(), (224, 224))
    assert (tv.prefix, tv.token_grid) == (1, (14, 14))
    swin = ModelHints.from_model(BY_KEY["swin"].build(), (224, 224))
    assert swin.output_fmt == "NHWC" and swin.feature_modules[-1] == "layers.3"
    # dynamic_img_size: the grid follows the input, not the constructor's img_size.
    dyn = timm.create_model("vit_tiny_patch16_224", pretrained=False, dynamic_img_size=True, depth=1)
    assert ModelHints.from_model(dyn, (160, 192)).token_grid == (10, 12)
    pinned = ModelHints.from_model(deit, (224, 224), LayoutSpec("nlc", 1, (7, 28)))
    assert (pinned.prefix, pinned.token_grid) == (1, (7, 28))


# --------------------------------------------------------------------------- the picker


@pytest.fixture(scope="module")
def built():
    cache: dict[str, nn.Module] = {}

    def get(key: str) -> nn.Module:
        if key not in cache:
            cache[key] = BY_KEY[key].build()
        return cache[key]

    return get


@pytest.mark.parametrize("family", FAMILIES, ids=[f.key for f in FAMILIES])
def test_picker_finds_the_live_layer(built, family: Family):
    name, layout = auto_target(built(family.key), family.size)
    assert name == family.layer, family.why
    assert (layout.kind, layout.prefix, layout.grid) == (family.layout, family.prefix, family.grid)


@pytest.mark.parametrize(("source", "kwargs", "size", "layer", "layout"), [
    # Average pooling over the patches: the block output is live, the register token is dropped.
    ("vit_pwee_patch16_reg1_gap_256", {"depth": 2}, 256, "blocks.1", Layout("nlc", (16, 16), 1)),
    ("eva02_tiny_patch14_224", {"depth": 2}, 224, "blocks.1", Layout("nlc", (16, 16), 1)),
    ("test_mambaout", {}, 160, "stages.3", Layout("nhwc", (5, 5))),
    ("test_coatnet", {}, 160, "norm", Layout("nchw", (5, 5))),
    ("tf_efficientnet_lite0", {}, 224, "bn2", Layout("nchw", (7, 7))),
])
def test_picker_on_more_timm_families(source, kwargs, size, layer, layout):
    model = Family("x", f"timm:{source}", kwargs, (size, size)).build()
    assert auto_target(model, (size, size)) == (layer, layout)


def test_list_layers_marks_dead_layers_and_skips_internals(built):
    infos = probe_layers(built("vit"), (224, 224))
    by_name = {i.name: i for i in infos}
    # The automatic choice: an Identity inside attention, read as a 197x64 map.
    k_norm = by_name["blocks.11.attn.k_norm"]
    assert k_norm.layout is None and k_norm.note == "inside attention" and k_norm.shape == (1, 3, 197, 64)
    assert by_name["blocks.11.attn.qkv"].note == "inside attention"
    assert by_name["blocks.11.ls1"].note == "pass-through"
    candidates = {i.name: i for i in list_layers(built("vit"), torch.zeros(1, 3, 224, 224))}
    assert not any(".attn" in n or n.endswith((".ls1", ".ls2", "drop_path1")) for n in candidates)
    for dead in ("blocks.11.norm2", "blocks.11.mlp.fc1", "blocks.11", "norm"):
        assert candidates[dead].live is False, dead  # class-token pooling: zero patch gradient
    assert candidates["blocks.11.norm1"].live and not candidates["blocks.11.norm1"].flat
    assert candidates["blocks.10"].live and candidates["patch_embed.proj"].layout == Layout("nchw", (14, 14))


class _Flat(nn.Module):
    """conv -> ``spread`` (the spatial mean broadcast back: a constant map) -> conv -> GAP -> fc."""

    class Spread(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3), keepdim=True).expand_as(x) * 1.0

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.spread = self.Spread()
        self.post = nn.Conv2d(6, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.post(self.spread(torch.relu(self.conv(x)))).mean(dim=(2, 3)))


def test_a_zero_head_is_named():
    """torchvision starts a ViT's head at zero: every gradient is zero, and the error says why."""
    torch.manual_seed(0)
    model = BY_KEY["tv_vit"].build()
    with torch.no_grad():
        model.heads.head.weight.zero_()
    with pytest.raises(ValueError, match="gradient is zero at every layer: is the classifier head all zeros"):
        auto_target(model, (224, 224))


def test_picker_skips_constant_maps():
    torch.manual_seed(0)
    model = _Flat().eval()
    infos = {i.name: i for i in list_layers(model, torch.zeros(1, 3, 32, 32))}
    assert infos["spread"].live and infos["spread"].flat and infos["post"].flat
    assert auto_target(model, (32, 32)) == ("conv", Layout("nchw", (16, 16)))


def test_picker_refuses_an_ambiguous_later_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 8, 8, stride=8), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 3)).eval()
    with pytest.raises(ValueError, match=r"layer '1' \(1, 8, 8, 8\): ambiguous: 8x8x8 reads as NCHW or NHWC: "
                                         r"pass the layout: --layout nchw or --layout nhwc; or --target-layer 0 "
                                         r"\(the last usable"):
        auto_target(model, (64, 64))
    assert auto_target(model, (64, 64), LayoutSpec("nchw")) == ("1", Layout("nchw", (8, 8)))


class _OwnViT(nn.Module):
    """A token model with a class token and none of timm's attributes: 16 px patches, one
    token-mixing layer, a norm, mean pooling over every token."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 16, stride=16)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.mix = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1)
        tokens = self.norm(tokens + self.mix(tokens).mean(dim=1, keepdim=True) * tokens)
        return self.head(tokens.mean(dim=1))


def test_undeclared_prefix_tokens_are_refused_until_pinned():
    torch.manual_seed(0)
    model = _OwnViT().eval()
    # Without the flags the patch embedding would be the last map: the picker refuses instead.
    with pytest.raises(ValueError, match=r"layer 'norm' \(1, 17, 8\): ambiguous: 17 tokens fit a 4x4 grid after 1 "
                                         r"prefix token the model does not declare \(it holds none as a cls_token "
                                         r"parameter\): pass the layout: --layout nlc --prefix-tokens 1 "):
        auto_target(model, (64, 64))
    assert auto_target(model, (64, 64), LayoutSpec("nlc", 1)) == ("norm", Layout("nlc", (4, 4), 1))
    with pytest.raises(ValueError, match="pass the layout"):
        CamEngine(copy.deepcopy(model), "norm", input_size=(64, 64))
    engine = CamEngine(copy.deepcopy(model), "norm", input_size=(64, 64), layout="nlc", prefix_tokens=1)
    maps = engine.cams(engine.forward(torch.randn(2, 3, 64, 64)), [0, 1], torch.tensor([1, 2]), ["gradcam"] * 2)
    assert maps.shape == (2, 4, 4) and maps.abs().amax() > 0


def test_engine_layout_overrides(built):
    model = built("deit")
    auto = CamEngine(copy.deepcopy(model), "auto")
    pinned = CamEngine(copy.deepcopy(model), "blocks.11.norm1", layout="nlc", prefix_tokens=2, grid=(14, 14))
    assert auto.layout == pinned.layout == Layout("nlc", (14, 14), 2)
    with pytest.raises(ValueError, match=r"outputs \(1, 198, 192\), which is no map as nlc"):
        CamEngine(copy.deepcopy(model), "blocks.11.norm1", layout="nlc", prefix_tokens=1, grid=(14, 14))
    with pytest.raises(ValueError, match="which is no map"):
        CamEngine(copy.deepcopy(model), "blocks.11.attn.k_norm")


# --------------------------------------------------------------------------- maps = pytorch-grad-cam


def _batch(family: Family, n: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn((n, 3, *family.size), generator=gen)


@pytest.mark.parametrize("family", FAMILIES, ids=[f.key for f in FAMILIES])
def test_every_method_equals_pytorch_grad_cam(built, family: Family):
    """Two images with two classes each, the five methods mixed in one call: each map equals
    pytorch-grad-cam's with the family's hand-written reshape_transform within 1e-5.

    In fp64: XGrad-CAM divides by each channel's activation sum over the map, which LayerNorm'd
    tokens bring near zero, so in fp32 both implementations sit ~1e-4 from the exact map (and
    from each other); fp64 compares the computations, not their rounding. Grad-CAM is compared
    in fp32 as well, where it is well conditioned.
    """
    model = built(family.key)
    x = _batch(family, 2)
    engine = CamEngine(copy.deepcopy(model).double(), family.layer, input_size=family.size)
    assert engine.layout.grid == family.grid
    cam_pass = engine.forward(x.double())
    ranked = cam_pass.logits.detach().argsort(dim=1, descending=True)
    # Image, class rank, method: every method on both ranks, rows interleaved.
    targets = [(r, k, m) for m in METHODS for k in (0, 1) for r in (k, 1 - k)]
    rows = [r for r, _, _ in targets]
    classes = torch.stack([ranked[r, k] for r, k, _ in targets])
    ours = normalize_maps(engine.cams(cam_pass, rows, classes, [m for _, _, m in targets]))
    assert ours.shape == (len(targets), *family.grid)

    twin = copy.deepcopy(model).double()
    layer = dict(twin.named_modules())[family.layer]
    by_rank = {k: pgc_maps(twin, layer, x.double(), ranked[:, k], METHODS, family.pgc_reshape()) for k in (0, 1)}
    shown = 0
    for p, (row, k, method) in enumerate(targets):
        want = by_rank[k][method][row]
        shown += float(want.amax()) > 0.99  # all-zero maps are legitimate (all weights < 0), but rare
        err = float((ours[p] - want).abs().amax())
        assert err <= 1e-5, f"{family.key} {method} row {row} class rank {k}: {err:.2e}"
    assert shown >= len(targets) - 3, "most reference maps must be non-trivial"

    # fp32, the served precision, Grad-CAM for the top class of each image.
    engine32 = CamEngine(copy.deepcopy(model), family.layer, input_size=family.size)
    top = ranked[:, 0]
    ours32 = normalize_maps(engine32.cams(engine32.forward(x), range(2), top, ["gradcam"] * 2))
    twin32 = copy.deepcopy(model)
    want32 = pgc_maps(twin32, dict(twin32.named_modules())[family.layer], x, top, ["gradcam"],
                      family.pgc_reshape())["gradcam"]
    assert (want32.flatten(1).amax(dim=1) > 0.99).all()
    torch.testing.assert_close(ours32, want32.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("key", ["vit", "swin", "levit"])
def test_batched_and_per_round_targets_agree(built, key):
    family = BY_KEY[key]
    x = _batch(family)
    rows, methods = [0, 0, 1, 2, 2], ["gradcam"] * 5
    maps = []
    for batched in (False, True):
        engine = CamEngine(copy.deepcopy(built(key)), family.layer, input_size=family.size,
                           batched_targets=batched)
        cam_pass = engine.forward(x)
        top = cam_pass.logits.detach().topk(2, dim=1).indices
        classes = torch.stack([top[0, 0], top[0, 1], top[1, 0], top[2, 0], top[2, 1]])
        maps.append(engine.cams(cam_pass, rows, classes, methods))
    assert maps[0].abs().amax() > 0
    torch.testing.assert_close(maps[0], maps[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("key", ["vit", "swin", "levit"])
def test_image_alone_equals_image_in_batch(built, key):
    family = BY_KEY[key]
    x = _batch(family, 4)
    engine = CamEngine(copy.deepcopy(built(key)), family.layer, input_size=family.size)
    cam_pass = engine.forward(x)
    targets = cam_pass.logits.detach().argmax(dim=1)
    batch = engine.cams(cam_pass, range(4), targets, ["gradcam"] * 4)
    alone = engine.cams(engine.forward(x[2:3]), [0], targets[2:3], ["gradcam"])
    torch.testing.assert_close(batch[2] / batch[2].amax(), alone[0] / batch[2].amax(), atol=1e-5, rtol=0)


def test_compute_cams_detects_the_layout(built):
    family = BY_KEY["deit"]
    model = built("deit")
    x = _batch(family, 2)
    engine = CamEngine(copy.deepcopy(model), family.layer)
    cam_pass = engine.forward(x)
    targets = cam_pass.logits.detach().argmax(dim=1)
    want = engine.cams(cam_pass, range(2), targets, ["gradcam"] * 2)
    got = compute_cams(copy.deepcopy(model), family.layer, x, targets)
    assert got.shape == (2, 14, 14)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("key", ["vit", "swin", "convnext", "levit"])
def test_bf16_autocast_on_cpu_every_layout(built, key):
    """bf16 autocast (the CPU runs it too) against fp32 on every layout: map correlation above
    0.95, except XGrad-CAM, which divides by near-zero channel sums on LayerNorm'd tokens (0.88 on
    the ViT)."""
    family = BY_KEY[key]
    x = _batch(family, 2)
    fp32 = CamEngine(copy.deepcopy(built(key)), family.layer, input_size=family.size)
    bf16 = CamEngine(copy.deepcopy(built(key)), family.layer, input_size=family.size, precision="bf16")
    fp32_pass, bf16_pass = fp32.forward(x), bf16.forward(x)
    assert bf16_pass.logits.dtype == torch.bfloat16  # autocast really ran in bf16
    top = fp32_pass.logits.detach().argmax(dim=1)
    rows, methods = [0, 1] * len(METHODS), [m for m in METHODS for _ in range(2)]
    want = fp32.cams(fp32_pass, rows, top[rows], methods)
    got = bf16.cams(bf16_pass, rows, top[rows], methods)  # several rounds: one vmapped pass
    assert got.dtype == torch.float32 and got.shape == (len(rows), *family.grid)
    for p in range(len(rows)):
        if want[p].amax() > 0:
            corr = torch.corrcoef(torch.stack([got[p].flatten(), want[p].flatten()]))[0, 1]
            assert corr > (0.8 if methods[p] == "xgradcam" else 0.95), (methods[p], rows[p], float(corr))
    assert (want.flatten(1).amax(dim=1) > 0).sum() >= len(rows) - 2


# --------------------------------------------------------------------------- the archiver refuses


def _archive_module():
    from handler.tools import archive

    return archive


@pytest.mark.parametrize("layer", ["blocks.11.norm2", "blocks.11"])
def test_dry_run_refuses_a_layer_with_zero_patch_gradient(built, layer):
    archive = _archive_module()
    config = ServeConfig.from_dict({"model": "timm:vit_tiny_patch16_224", "target_layer": layer})
    with pytest.raises(archive.ArchiveError) as err:
        archive.dry_run(copy.deepcopy(built("vit")), config)
    message = str(err.value)
    assert f"gradient at '{layer}' (nlc 14x14 (+1 prefix token)) is all zero at its patch tokens" in message
    assert "blocks.11.norm1 (nlc 14x14" in message and "the automatic choice is blocks.11.norm1" in message


def test_dry_run_refuses_a_constant_map():
    archive = _archive_module()
    torch.manual_seed(0)
    config = ServeConfig.from_dict({"model": "x.py:Flat", "num_classes": 4, "target_layer": "spread",
                                    "input_size": [32, 32]})
    with pytest.raises(archive.ArchiveError, match=r"'spread' \(nchw 16x16\) gives a constant Grad-CAM map.*"
                                                   r"layers whose maps depend on the class: conv \(nchw 16x16\)"):
        archive.dry_run(_Flat().eval(), config)


def test_list_layers_cli_shows_layout_grid_and_dead_layers():
    done = run_main(["--model", "timm:deit_tiny_distilled_patch16_224", "--list-layers"])
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.startswith(("blocks", "norm"))}
    assert rows["blocks.11.norm1"][1:] == ["(1,", "198,", "192)", "nlc", "+2", "14x14", "ok", "<-", "auto"]
    for dead in ("blocks.11.norm2", "blocks.11", "norm"):
        assert rows[dead][-1] == "zero", rows[dead]
    assert "blocks.11.attn.k_norm" not in done.stdout


def test_archiver_layout_flags_are_checked():
    done = run_main(["--model", "timm:vit_tiny_patch16_224", "--list-layers", "--layout", "nchw",
                     "--prefix-tokens", "1"])
    assert done.returncode == 2 and "prefix tokens apply to the nlc layout, not nchw" in done.stderr
