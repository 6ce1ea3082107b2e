"""handler/tools/archive.py takes a classifier as its user gives it: the class count from the model and
its weights (torchvision without flags, another head, a headless timm model with a head's
weights), clear refusals for a headless model and a --num-classes the weights contradict, prefix
tokens that the model holds as parameters, and no attention internal or class-attention branch
as the target. Archive-only, eager, in this process (``archive.main``) unless the CLI is the point.
"""

from __future__ import annotations

import json
import logging
import zipfile

import pytest
import timm
import torch
import torchvision
import yaml
from conftest import DATA, EAGER
from support.archiver_main import run_main
from support.families import Family

from handler.layouts import Layout, ModelHints, auto_target, probe_layers, token_parameters
from handler.models import build_model, classifier_head, weights_classes


def _archive_module():
    from handler.tools import archive

    return archive


def _save(model: torch.nn.Module, path) -> str:
    torch.save(model.state_dict(), path)  # as users save them
    return str(path)


def _archive(tmp_path, caplog, *args: str) -> tuple[int, str, dict | None]:
    """``archive.main`` in this process: exit code, its error line, the written handler config."""
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="archive"):
        code = _archive_module().main(["-q", "--export-path", str(tmp_path), "--name", "m", "--force", *args, *EAGER])
    errors = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    config = None
    if code == 0:
        with zipfile.ZipFile(tmp_path / "m.mar") as mar:
            config = yaml.safe_load(mar.read("model-config.yaml"))["handler"]
    return code, errors, config


@pytest.fixture(scope="module")
def headless_weights(tmp_path_factory):
    """EVA-02 tiny as timm builds it (num_classes=0, a feature extractor), and with a 7-class head."""
    folder = tmp_path_factory.mktemp("headless")
    torch.manual_seed(0)
    return {
        "none": _save(timm.create_model("eva02_tiny_patch14_224", pretrained=False), folder / "eva_headless.pt"),
        "seven": _save(timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=7),
                       folder / "eva_7.pt"),
    }


# --------------------------------------------------------------------------- the class count


def test_torchvision_model_archives_with_model_and_weights_only(tmp_path):
    """The issue's case, as a user runs it: 1000 columns, so 1000 classes and ImageNet's labels."""
    torch.manual_seed(0)
    weights = _save(torchvision.models.resnet18(), tmp_path / "resnet18.pth")
    done = run_main(["--model", "torchvision:resnet18", "--weights", str(weights), "--export-path", str(tmp_path),
                     *EAGER])
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    with zipfile.ZipFile(tmp_path / "resnet18.mar") as mar:
        config = yaml.safe_load(mar.read("model-config.yaml"))["handler"]
        labels = mar.read("index_to_name.json")
    assert config["num_classes"] == 1000 and config["labels"] == "index_to_name.json"
    assert config["target_layer"] == "layer4" and config["topk"] == 5
    assert b'"285": "Egyptian cat"' in labels


def test_a_ten_class_head_is_read_from_the_weights(tmp_path, caplog, weights):
    """The session's resnet18 weights have a 10-class fc (nested, DataParallel names)."""
    code, errors, config = _archive(tmp_path, caplog, "--model", "torchvision:resnet18",
                                    "--weights", str(weights["resnet18"]), "--input-size", "64")
    assert code == 0, errors
    assert config["num_classes"] == 10 and config["labels"] == "" and config["model"] == "torchvision:resnet18"
    # The handler builds the same model from the config: 10 outputs.
    assert build_model(config["model"], config["num_classes"]).fc.out_features == 10


def test_num_classes_that_contradicts_the_weights_is_refused(tmp_path, caplog, weights):
    code, errors, _ = _archive(tmp_path, caplog, "--model", "torchvision:resnet18", "--num-classes", "5",
                               "--weights", str(weights["resnet18"]), "--input-size", "64")
    assert code == 2
    assert ("--num-classes 5 does not match the weights: their classifier 'fc.weight' has 10 classes. "
            "Leave out --num-classes to serve the weights' 10 classes, or pass weights trained with a 5-class "
            "head") in errors
    assert not (tmp_path / "m.mar").exists()


def test_own_model_py_gets_its_classes_from_the_weights(tmp_path, caplog, weights):
    """TinyNet builds 3 classes by default; a 5-class checkpoint gets a 5-class TinyNet."""
    sys_path_model = DATA / "tinynet" / "model.py"
    import importlib.util

    spec = importlib.util.spec_from_file_location("_tiny_for_test", sys_path_model)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    five = _save(module.TinyNet(num_classes=5), tmp_path / "tiny5.pt")
    code, errors, config = _archive(tmp_path, caplog, "--model", f"{sys_path_model}:TinyNet", "--weights", five,
                                    "--input-size", "64")
    assert code == 0, errors
    assert config["num_classes"] == 5 and config["topk"] == 5
    code, errors, config = _archive(tmp_path, caplog, "--model", f"{sys_path_model}:TinyNet",
                                    "--weights", str(weights["tinynet"]), "--input-size", "64")
    assert code == 0, errors
    assert config["num_classes"] == 3 and config["topk"] == 3


def test_classifier_head_of_each_source():
    torch.manual_seed(0)
    head = classifier_head(torchvision.models.squeezenet1_1(num_classes=4).eval(), (64, 64))
    assert (head.classes, head.keys, head.headless) == (4, ("classifier.1.weight",), False)
    deit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, depth=1, num_classes=6).eval()
    assert classifier_head(deit, (224, 224)).keys == ("head.weight", "head_dist.weight")
    eva = timm.create_model("eva02_tiny_patch14_224", pretrained=False, depth=1).eval()
    head = classifier_head(eva, (224, 224))
    assert (head.classes, head.keys, head.headless) == (192, ("head.weight",), True)
    assert weights_classes({"head.weight": torch.zeros(7, 192)}, head) == (7, "head.weight")
    assert weights_classes({}, head) is None


# --------------------------------------------------------------------------- headless models


def test_a_headless_model_is_refused_with_both_ways_forward(tmp_path, caplog, headless_weights):
    code, errors, _ = _archive(tmp_path, caplog, "--model", "timm:eva02_tiny_patch14_224",
                               "--weights", headless_weights["none"])
    assert code == 2
    assert ("timm:eva02_tiny_patch14_224 has no classifier head: it outputs 192 features per image, not class "
            "scores (timm builds it with num_classes=0, as a feature extractor)") in errors
    assert ("Two ways forward: --weights from a checkpoint with a classifier head (one that holds 'head.weight'; "
            "the class count is read from it), or --num-classes N with --weights that hold that N-class head") in errors


def test_a_headless_model_with_num_classes_needs_the_head_in_the_weights(tmp_path, caplog, headless_weights):
    code, errors, _ = _archive(tmp_path, caplog, "--model", "timm:eva02_tiny_patch14_224", "--num-classes", "10",
                               "--weights", headless_weights["none"])
    assert code == 2
    assert ("the weights have no classifier head: head.weight, head.bias are not in them (a checkpoint saved from "
            "a feature extractor). --num-classes 10 needs --weights that hold that 10-class head") in errors


def test_a_headless_architecture_with_a_head_checkpoint_archives(tmp_path, caplog, headless_weights):
    """Without flags: the head's 7 classes come from the weights; with --num-classes 7 the same."""
    for extra in ((), ("--num-classes", "7")):
        code, errors, config = _archive(tmp_path, caplog, "--model", "timm:eva02_tiny_patch14_224",
                                        "--weights", headless_weights["seven"], *extra)
        assert code == 0, errors
        assert config["num_classes"] == 7 and config["target_layer"] == "blocks.11"
        assert (config["layout"], config["prefix_tokens"], config["grid"]) == ("nlc", 1, [16, 16])


def test_list_layers_of_a_headless_model_says_so():
    done = run_main(["--model", "timm:eva02_tiny_patch14_224", "--list-layers"])
    assert done.returncode == 2 and "has no classifier head" in done.stderr and "Traceback" not in done.stderr


# --------------------------------------------------------------------------- prefix tokens and the picker


def test_prefix_tokens_held_as_parameters():
    torch.manual_seed(0)
    coat = timm.create_model("coat_lite_tiny", pretrained=False).eval()
    crossvit = timm.create_model("crossvit_tiny_240", pretrained=False).eval()
    assert token_parameters(coat) == 1  # cls_token1..4, one per stage
    assert token_parameters(crossvit) == 1  # cls_token_0/1, one per branch
    assert ModelHints.from_model(coat, (224, 224)).prefix == 1
    assert token_parameters(torch.nn.Linear(2, 2)) == 0


def test_cait_target_is_the_last_self_attention_block():
    """CaiT: the picker once chose blocks_token_only.1.attn.v (an attention internal). The
    class-attention blocks return the class token alone; the patch tokens they all read are
    the last self-attention block's output."""
    model = Family("cait", "timm:cait_xxs24_224", {"depth": 2}).build()
    infos = {i.name: i for i in probe_layers(model, (224, 224))}
    assert infos["blocks_token_only.1.attn.v"].note == "inside attention"
    assert infos["blocks_token_only.1.norm1"].note == "inside a class-attention block"
    name, layout = auto_target(model, (224, 224))
    assert (name, layout) == ("blocks.1", Layout("nlc", (14, 14), 0))


@pytest.mark.parametrize(("source", "layer", "layout"), [
    ("coat_lite_tiny", "serial_blocks4.1.norm1", Layout("nlc", (7, 7), 1)),
    # Its second branch sees the image resized to 224 px: 14x14 patches of 16 px.
    ("crossvit_tiny_240", "blocks.2.blocks.1", Layout("nlc", (14, 14), 1)),
])
def test_coat_and_crossvit_archive_without_flags(tmp_path, caplog, source, layer, layout):
    """Class tokens held as parameters, not declared as num_prefix_tokens: read from the model.
    CoaT's blocks share modules with the model (tied tensors), which safetensors must not refuse."""
    torch.manual_seed(0)
    weights = _save(timm.create_model(source, pretrained=False), tmp_path / "w.pt")
    code, errors, config = _archive(tmp_path, caplog, "--model", f"timm:{source}", "--weights", weights)
    assert code == 0, errors
    assert config["num_classes"] == 1000 and config["target_layer"] == layer
    assert (config["layout"], config["prefix_tokens"], config["grid"]) == (layout.kind, layout.prefix,
                                                                          list(layout.grid))


# --------------------------------------------------------------------------- default attention method


def test_a_default_attention_method_the_model_refuses_stops_the_archiver(tmp_path, caplog, weights):
    """--cam-method legrad on a CNN: refused when archiving, with the reason the server would give,
    instead of an archive whose workers fail to load. On a ViT it archives."""
    code, errors, _ = _archive(tmp_path, caplog, "--model", "torchvision:resnet18", "--cam-method", "legrad",
                               "--weights", str(weights["resnet18"]), "--input-size", "64")
    assert code == 2 and not (tmp_path / "m.mar").exists()
    assert "--cam-method legrad does not apply to this model: chefer/legrad explain a transformer" in errors
    assert "ResNet has no timm ViT/Eva or torchvision ViT attention blocks" in errors
    kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    torch.manual_seed(0)
    vit = _save(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, **kwargs),
                tmp_path / "vit.pt")
    code, errors, config = _archive(tmp_path, caplog, "--model", "timm:vit_tiny_patch16_224", "--cam-method",
                                    "legrad", "--model-kwargs", json.dumps(kwargs), "--weights", vit)
    assert code == 0, errors
    assert config["cam_method"] == "legrad"
