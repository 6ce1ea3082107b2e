#!/usr/bin/env python3
"""Archive many classifier families the way a new user would, and count what happens.

Each model is built with random weights, its state dict saved to a file, and
``handler/tools/archive.py --model SRC:NAME --weights FILE`` run on it with nothing else (in this
process, through ``archive.main``; eager, so nothing is compiled or timed). Every torchvision
classification family (``torchvision.models.list_models(module=torchvision.models)``, the
smallest model of each family, or every model with ``--torchvision all``) and a spread of timm
families, headless ones included (EVA-02 and DINOv2 with registers as timm builds them:
``num_classes=0``), plus a few checkpoints that differ from the constructor's head (a 10-class
torchvision head, a headless timm model's weights with a head).

A model comes out archived, refused (the archiver's one-line error, which must say what to
pass) or with a traceback (a bug). Weight matrices that the constructor leaves at zero
(torchvision's ViT head, some layer scales) get small random values first, as any trained
checkpoint has: an all-zero head makes every map empty and is refused for that reason.

Prints a table and writes bench_results/family_sweep.json.

  .venv/bin/python scripts/bench/family_sweep.py
  .venv/bin/python scripts/bench/family_sweep.py --only 'cait|coat' --torchvision none
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Case:
    """One archive attempt.

    Attributes:
        source: the archiver's ``--model``.
        build_kwargs: constructor arguments of the model whose weights are saved (not passed to
            the archiver).
        args: archiver flags besides ``--model`` and ``--weights``.
        note: what the case shows.
    """

    source: str
    build_kwargs: dict = field(default_factory=dict)
    args: tuple[str, ...] = ()
    note: str = ""

    @property
    def key(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in self.build_kwargs.items())
        flags = f" {' '.join(self.args)}" if self.args else ""
        return f"{self.source}{extra}{flags}"


TIMM = [
    "resnet18", "resnet50d", "resnext26ts", "seresnext26d_32x4d", "regnetx_002", "regnety_002", "dla34",
    "densenet121", "vgg11", "inception_v3", "xception41", "mobilenetv2_050", "mobilenetv3_small_050",
    "mobilenetv4_conv_small", "efficientnet_b0", "tf_efficientnet_lite0", "efficientnetv2_rw_t", "ghostnet_100",
    "mnasnet_small", "fbnetc_100", "lcnet_050", "hrnet_w18_small", "rexnet_100", "repvgg_a0", "convnext_atto",
    "convnextv2_atto", "edgenext_xx_small", "efficientformer_l1", "efficientformerv2_s0", "fastvit_t8",
    "mobileone_s0", "mobilevit_xxs", "mobilevitv2_050", "levit_128s", "poolformer_s12", "poolformerv2_s12",
    "convmixer_768_32", "resmlp_12_224", "mixer_s32_224", "gmlp_ti16_224", "vit_tiny_patch16_224",
    "vit_small_patch32_224", "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "beit_base_patch16_224",
    "cait_xxs24_224", "coat_lite_tiny", "coat_tiny", "crossvit_tiny_240", "pit_ti_224", "tnt_s_patch16_224",
    "twins_svt_small", "swin_tiny_patch4_window7_224", "swinv2_cr_tiny_ns_224", "maxvit_pico_rw_256",
    "coatnet_nano_rw_224", "nest_tiny", "xcit_nano_12_p16_224", "volo_d1_224", "pvt_v2_b0", "mvitv2_tiny",
    "tiny_vit_5m_224", "davit_tiny", "focalnet_tiny_srf", "gcvit_xxtiny", "hgnet_tiny", "inception_next_tiny",
    "mambaout_femto", "nextvit_small", "repvit_m1", "sequencer2d_s", "vit_pwee_patch16_reg1_gap_256",
    "eva02_tiny_patch14_224", "vit_small_patch14_reg4_dinov2",
]
EXTRA = [
    Case("torchvision:resnet18", {"num_classes": 10}, note="10-class head: classes from the weights"),
    Case("timm:eva02_tiny_patch14_224", {"num_classes": 1000}, note="headless architecture, checkpoint with a head"),
    Case("timm:vit_small_patch14_reg4_dinov2", {"num_classes": 5}, ("--num-classes", "5"),
         note="headless architecture, 5-class head and --num-classes"),
]


def torchvision_models(which: str) -> list[str]:
    """torchvision's classification models: ``all``, ``none``, or the smallest of each family
    (the name without its size: vgg11_bn's family is vgg_bn, regnet_x_400mf's regnet_x)."""
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if which in ("all", "none"):
        return names if which == "all" else []
    families: dict[str, str] = {}
    for name in names:
        family = re.sub(r"_(tiny|small|base|large|[tsbmlh](_\d+)?|b\d|x\d_\d|\d+(_\d)?[mg]f|\d+x\d+d)$", "", name)
        family = re.sub(r"(?<=[a-uw-z])\d+(_\d+)?(?=(_bn)?$)", "", family)  # not v2 of mobilenet_v2
        smallest = families.get(family)
        if smallest is None or _size(name) < _size(smallest):
            families[family] = name
    return sorted(families.values())


def _size(name: str) -> int:
    import torchvision

    # torchvision's installed weight metadata (nothing downloaded, nothing built).
    return torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"]


def build(source: str, kwargs: dict):
    import torch

    torch.manual_seed(0)
    kind, _, name = source.partition(":")
    if kind == "timm":
        import timm

        model = timm.create_model(name, pretrained=False, **kwargs)
    else:
        import torchvision

        model = torchvision.models.get_model(name, weights=None, **kwargs)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained checkpoint has no all-zero weight matrix
        for p in model.parameters():
            if p.dim() > 1 and not torch.count_nonzero(p):
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def attempt(archive, case: Case, tmp: Path) -> dict:
    """Build, save, archive: the outcome, the archiver's message or the exception, the layer."""
    import torch
    import yaml

    started = time.perf_counter()
    row = {"model": case.key, "note": case.note}
    try:
        model = build(case.source, case.build_kwargs)
    except Exception as exc:  # a model this timm/torchvision cannot build here: not the archiver's
        return {**row, "outcome": "skipped", "message": f"cannot build: {type(exc).__name__}: {exc}"}
    weights = tmp / "weights.pt"
    torch.save(model.state_dict(), weights)  # as users save them (safetensors refuses tied tensors)
    del model
    errors = _Errors()
    log = logging.getLogger("archive")
    log.addHandler(errors)
    log.propagate = False  # the table says it
    name = re.sub(r"\W+", "_", case.key)[:60]
    argv = ["-q", "--model", case.source, "--weights", str(weights), "--export-path", str(tmp), "--name", name,
            "--force", "--compile", "off", "--channels-last", "off", *case.args]
    try:
        code = archive.main(argv)
    except BaseException as exc:  # noqa: BLE001 - a traceback is what this script counts
        import traceback

        where = traceback.extract_tb(exc.__traceback__)[-1]
        return {**row, "outcome": "traceback", "seconds": round(time.perf_counter() - started, 1),
                "message": f"{type(exc).__name__}: {exc} ({Path(where.filename).name}:{where.lineno})"}
    finally:
        log.removeHandler(errors)
        log.propagate = True
        weights.unlink(missing_ok=True)
        gc.collect()
    row["seconds"] = round(time.perf_counter() - started, 1)
    if code != 0:
        message = errors.messages[-1] if errors.messages else f"exit {code}"
        return {**row, "outcome": "refused", "message": message.removeprefix("error: ")}
    mar = tmp / f"{name}.mar"
    import zipfile

    with zipfile.ZipFile(mar) as zf:
        config = yaml.safe_load(zf.read("model-config.yaml"))["handler"]
    mar.unlink()
    layout = config["layout"] + (f" +{config['prefix_tokens']}" if config.get("prefix_tokens") else "")
    return {**row, "outcome": "archived", "num_classes": config["num_classes"], "target_layer": config["target_layer"],
            "layout": layout, "input_size": config["input_size"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--torchvision", choices=("families", "all", "none"), default="families",
                   help="torchvision models: the smallest of each family, all 80, or none (default: %(default)s)")
    p.add_argument("--timm", choices=("yes", "no"), default="yes", help="the timm families")
    p.add_argument("--only", default=None, metavar="REGEX", help="only the cases whose name matches")
    p.add_argument("--json-out", type=Path, default=ROOT / "bench_results" / "family_sweep.json")
    p.add_argument("--machine", default=None, help="how the machine is named in the JSON (default: platform, cores)")
    args = p.parse_args(argv)

    import torch
    import torchvision

    warnings.filterwarnings("ignore", category=UserWarning)  # torchvision's GoogLeNet/Inception init notes
    warnings.filterwarnings("ignore", category=FutureWarning)
    from handler.tools import archive

    cases = [Case(f"torchvision:{n}") for n in torchvision_models(args.torchvision)]
    if args.timm == "yes":
        cases += [Case(f"timm:{n}") for n in TIMM]
    cases += [c for c in EXTRA if args.timm == "yes" or c.source.startswith("torchvision")]
    if args.only:
        cases = [c for c in cases if re.search(args.only, c.key)]
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="family-sweep-") as tmp:
        for case in cases:
            row = attempt(archive, case, Path(tmp))
            rows.append(row)
            detail = (f"{row['num_classes']} classes, {row['target_layer']} ({row['layout']})"
                      if row["outcome"] == "archived" else row.get("message", ""))
            print(f"{row['outcome']:<9} {row.get('seconds', 0):>5.1f}s  {row['model']}: {detail}", flush=True)
    counts = {k: sum(r["outcome"] == k for r in rows) for k in ("archived", "refused", "traceback", "skipped")}

    print("\n| model | outcome | classes | target layer (layout) / reason |\n| --- | --- | --- | --- |")
    for r in rows:
        if r["outcome"] == "archived":
            print(f"| {r['model']} | archived | {r['num_classes']} | {r['target_layer']} ({r['layout']}) |")
        else:
            print(f"| {r['model']} | {r['outcome']} | | {r['message']} |")
    print("\n" + ", ".join(f"{v} {k}" for k, v in counts.items()) + f" of {len(rows)} in "
          f"{time.perf_counter() - started:.0f}s")
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({
        "date": date.today().isoformat(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": args.machine or f"{platform.platform()}, {os.cpu_count()} cores",
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "timm": __import__("timm").__version__, "counts": counts, "rows": rows,
    }, indent=1))
    print(f"wrote {args.json_out}")
    return 1 if counts["traceback"] else 0


if __name__ == "__main__":
    sys.exit(main())
