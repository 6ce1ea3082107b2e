"""handler/tools/archive.py: archives for every model source, served for real; mistakes caught at build."""

from __future__ import annotations

import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
import yaml
from conftest import DATA, EAGER, photo, run_archiver
from support.archiver_main import Done, run_main


def _archiver(*args: str) -> Done:
    """handler/tools/archive.py's ``main`` run in this process, as ``python -m
    handler.tools.archive ARGS`` runs it (exit status, stdout, stderr; eager unless a test picks
    ``--compile``, as ``run_archiver``): the same code path without a process that imports torch
    and timm again for every check. The CLI as a process is tested by ``test_help_teaches_with_examples``
    and ``test_parallel_builds_of_one_name_do_not_collide``."""
    if not any(a.startswith(("--compile", "--channels-last", "--help")) for a in args):
        args = (*args, *EAGER)
    return run_main(list(args))


@pytest.mark.server
@pytest.mark.parametrize(
    ("model", "labels", "grid"),
    [
        ("resnet18_10", [f"digit {i}" for i in range(10)], [7, 7]),
        ("mobilenetv3", None, [7, 7]),
        ("tinynet", ["circle", "square", "triangle"], [8, 8]),
    ],
)
def test_archived_models_serve_predictions_and_maps(server, model, labels, grid):
    r = server.predict(model, files={"image": ("cat.jpg", photo("chelsea.jpg"))})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == model and body["grid_size"] == grid and body["layout"] == "nchw"
    classes = 1000 if labels is None else len(labels)
    assert len(body["predictions"]) == min(5, classes)
    for p in body["predictions"]:
        assert 0 <= p["class_id"] < classes
        if labels is not None:
            assert p["label"] == labels[p["class_id"]]
    (cam,) = body["cams"]
    assert cam["class_id"] == body["predictions"][0]["class_id"]
    assert np.array(cam["map"]).shape == tuple(reversed(grid))
    if model == "mobilenetv3":  # archived with --outputs map,heatmap and ImageNet labels
        assert "heatmap" in cam
        assert body["predictions"][0]["label"] != str(body["predictions"][0]["class_id"])


def test_archive_is_self_contained(model_store):
    with zipfile.ZipFile(model_store / "tinynet.mar") as mar:
        names = set(mar.namelist())
        config = yaml.safe_load(mar.read("model-config.yaml"))
    assert {"ts_entry.py", "model.safetensors", "index_to_name.json", "model-config.yaml",
            "model_src/model.py", "handler/cam.py", "handler/service.py", "handler/codec.py"} <= names
    assert config["batchSize"] == 8 and config["maxBatchDelay"] > 0 and config["minWorkers"] >= 1
    handler = config["handler"]
    assert handler["model"] == "model_src/model.py:TinyNet" and handler["target_layer"] == "features"
    assert handler["input_size"] == [64, 64] and handler["num_classes"] == 3


def test_default_archive_uses_the_timm_config(model_store):
    with zipfile.ZipFile(model_store / "efficientnet_lite0.mar") as mar:
        handler = yaml.safe_load(mar.read("model-config.yaml"))["handler"]
    assert handler["model"] == "timm:tf_efficientnet_lite0" and handler["target_layer"] == "bn2"
    assert handler["mean"] == [0.5, 0.5, 0.5] and handler["std"] == [0.5, 0.5, 0.5]
    assert handler["interpolation"] == "bicubic" and handler["input_size"] == [224, 224]
    assert (handler["malloc_mmap_threshold_mib"], handler["malloc_trim_threshold_mib"]) == (256, 1024)


def test_help_teaches_with_examples():
    done = run_archiver("--help")
    assert done.returncode == 0
    for flag in ("--model", "--weights", "--num-classes", "--target-layer", "--list-layers", "--labels",
                 "--name", "--export-path", "--force", "examples:", "torchvision:resnet18"):
        assert flag in done.stdout


def test_list_layers_prints_candidates_with_shapes():
    done = _archiver("--model", "torchvision:resnet18", "--list-layers")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    (auto,) = [line for line in lines if line.endswith("<- auto")]
    assert auto.split() == ["layer4", "(1,", "512,", "7,", "7)", "nchw", "7x7", "ok", "<-", "auto"]
    assert any(line.split() == ["layer3", "(1,", "256,", "14,", "14)", "nchw", "14x14", "ok"] for line in lines)
    assert lines.index(auto) > max(i for i, line in enumerate(lines) if line.startswith("layer4.1"))


@pytest.fixture(scope="module")
def tiny_weights(weights):
    return weights["tinynet"]


def _tiny(tmp_path, *extra: str) -> Done:
    return _archiver("--model", f"{DATA / 'tinynet' / 'model.py'}:TinyNet", "--num-classes", "3",
                     "--input-size", "64", "--export-path", str(tmp_path), "--name", "tiny", *extra)


def test_wrong_target_layer_names_the_closest(tmp_path, tiny_weights):
    done = _tiny(tmp_path, "--weights", str(tiny_weights), "--target-layer", "feature")
    assert done.returncode != 0
    assert "target layer 'feature' is not a module" in done.stderr and "closest: features" in done.stderr
    assert not (tmp_path / "tiny.mar").exists()


def test_layer_the_score_does_not_depend_on_is_refused(tmp_path, weights):
    done = _archiver("--model", "torchvision:resnet18", "--num-classes", "10", "--weights",
                     str(weights["resnet18"]), "--target-layer", "fc", "--export-path", str(tmp_path))
    assert done.returncode != 0 and "fc" in done.stderr


def test_weights_of_another_architecture_are_named(tmp_path, weights):
    done = _tiny(tmp_path, "--weights", str(weights["resnet18"]))
    assert done.returncode != 0
    assert "weights do not fit the model" in done.stderr
    assert "missing" in done.stderr and "features.0.weight" in done.stderr
    assert "unexpected" in done.stderr and "layer1.0.conv1.weight" in done.stderr


def test_label_count_mismatch(tmp_path, tiny_weights, weights):
    done = _tiny(tmp_path, "--weights", str(tiny_weights), "--labels", str(weights["labels10"]))
    assert done.returncode != 0 and "name 10 classes but the model has 3" in done.stderr


def test_unreadable_weights_file(tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"definitely not a checkpoint")
    done = _tiny(tmp_path, "--weights", str(broken))
    assert done.returncode != 0 and "cannot read weights file" in done.stderr
    done = _tiny(tmp_path, "--weights", str(tmp_path / "missing.safetensors"))
    assert done.returncode != 0 and "does not exist" in done.stderr


class _Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickled_code_is_never_executed(tmp_path):
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"features.0.weight": _Payload()}))
    done = _tiny(tmp_path, "--weights", str(evil))
    assert done.returncode != 0 and "cannot read weights file" in done.stderr
    assert "pickled code ran" not in done.stdout + done.stderr


def test_existing_archive_needs_force(tmp_path, tiny_weights):
    assert _tiny(tmp_path, "--weights", str(tiny_weights)).returncode == 0
    again = _tiny(tmp_path, "--weights", str(tiny_weights))
    assert again.returncode != 0 and "exists; pass --force" in again.stderr
    assert _tiny(tmp_path, "--weights", str(tiny_weights), "--force", "--malloc-thresholds", "0", "64").returncode == 0
    with zipfile.ZipFile(tmp_path / "tiny.mar") as mar:
        handler = yaml.safe_load(mar.read("model-config.yaml"))["handler"]
    assert (handler["malloc_mmap_threshold_mib"], handler["malloc_trim_threshold_mib"]) == (0, 64)
    bad = _tiny(tmp_path, "--weights", str(tiny_weights), "--force", "--malloc-thresholds", "256", "4096")
    assert bad.returncode != 0 and "'malloc_trim_threshold_mib' must be 0" in bad.stderr


def test_decode_settings_reach_the_handler_config(tmp_path, tiny_weights):
    done = _tiny(tmp_path, "--weights", str(tiny_weights), "--decode-threads", "0", "--decode-device", "cpu",
                 "--encode-device", "cuda")
    assert done.returncode == 0, done.stderr
    with zipfile.ZipFile(tmp_path / "tiny.mar") as mar:
        handler = yaml.safe_load(mar.read("model-config.yaml"))["handler"]
    assert (handler["decode_threads"], handler["decode_device"], handler["encode_device"]) == (0, "cpu", "cuda")
    bad = _tiny(tmp_path, "--weights", str(tiny_weights), "--force", "--decode-threads", "99")
    assert bad.returncode != 0 and "'decode_threads' must be an integer in 0..64" in bad.stderr


def test_parallel_builds_of_one_name_do_not_collide(tmp_path, tiny_weights):
    outs = [tmp_path / "a", tmp_path / "b"]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "handler.tools.archive", "-q", "--model",
         f"{DATA / 'tinynet' / 'model.py'}:TinyNet", "--num-classes", "3", "--input-size", "64",
         "--weights", str(tiny_weights), "--name", "same", "--export-path", str(out), *EAGER],
        stderr=subprocess.PIPE, text=True) for out in outs]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    for out in outs:
        with zipfile.ZipFile(out / "same.mar") as mar:
            assert "model_src/model.py" in mar.namelist()


def test_nested_and_dataparallel_checkpoints_load(tmp_path, weights):
    # The session's resnet18_10 weights are nested under 'state_dict' with 'module.' prefixes.
    saved = torch.load(weights["resnet18"], weights_only=True)
    assert all(k.startswith("module.") for k in saved["state_dict"])
    done = _archiver("--model", "torchvision:resnet18", "--num-classes", "10", "--weights",
                     str(weights["resnet18"]), "--export-path", str(tmp_path), "--name", "r")
    assert done.returncode == 0, done.stderr
    assert "target layer layer4, layout nchw 7x7" in done.stderr
