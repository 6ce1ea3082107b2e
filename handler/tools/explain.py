#!/usr/bin/env python3
"""Send photos to the Grad-CAM server; save each answer (JSON) and its pictures (heatmap, overlay).

Each IMAGE_OR_DIR is a photo or a folder. Folders are walked (recursively, hidden names and the
--out folder skipped) for .jpg .jpeg .png .webp .gif .bmp .tif .tiff files, any letter case;
a file named on the command line is always sent, whatever its name, so a broken one is reported.

stdout gets one tab-separated line per photo, in the order answers arrive:
  PATH <tab> ok    <tab> TOP-1 LABEL <tab> PROBABILITY <tab> LATENCY ms
     (with --quality, one more column: the first map's faithfulness, e.g. "kept 0.82 removed 0.11":
     the class's confidence with only the map's top region kept, and with that region removed)
  PATH <tab> error <tab> HTTP STATUS (- when there was no answer) <tab> WHAT WENT WRONG
(--jsonl prints one JSON object per photo instead). stderr gets the progress bar (when stderr is
a terminal and there are many photos, or with --progress) and a summary.

--out gets, per photo, NAME.json (the server's answer, its base64 pictures replaced by the file
names of NAME.CLASS_ID.heatmap.png and NAME.CLASS_ID.overlay.jpg, plus a "client" record:
source file, status, latency, attempts; or the error the server answered) and the pictures
asked for. NAME is the photo's file name without extension; photos that share it (a/cat.jpg,
b/cat.jpg, cat.png) get NAME-<8 hex digits of a hash of their path> instead. index.jsonl lists
every photo with its result and files.

Retries: a 503 (TorchServe's job queue is full, or the model has no worker yet), a 507 (the
worker died while it had the request, or the batch ran out of device memory: the batch failed,
not the photo) and a dropped connection (reset, refused, closed without an answer) are retried
up to --retries times with jittered exponential backoff (honouring Retry-After). Asking for a
prediction changes nothing on the server, so a retry is always safe; the bound keeps a photo
that really does kill the worker from doing so more than --retries + 1 times. No answer within
--timeout fails the photo without a retry (the server may still be working on it).

Exit status: 0 when every photo got its answer, 1 when any photo failed (its line says why: a
corrupt or unsupported file, one over the server's size limits, an unreadable path, retries
exhausted), 2 when nothing can work: the server is unreachable, refuses the token, does not
serve the model, or refuses an option (checked with /ping before the first photo, and stopped
at the first such answer, with one message).

examples:
  # every photo in tests/data against `make serve` (URL from config.properties, token from
  # key_file.json); overlays and JSON land in explain-out/
  .venv/bin/gradcam-explain tests/data

  # top-3, Grad-CAM++ heatmaps and overlays for the two best classes, 8 requests in flight
  .venv/bin/gradcam-explain photos/ --topk 3 --cam-classes top2 --cam-method gradcam++ \\
      --outputs heatmap,overlay --out results/ --concurrency 8

  # each map's faithfulness score (one more forward pass on the server), attention maps on a ViT
  .venv/bin/gradcam-explain photos/ --quality
  .venv/bin/gradcam-explain photos/ --model my_vit --cam-method chefer

  # maps only (small JSON, no pictures), machine-readable lines
  .venv/bin/gradcam-explain photos/ --outputs map --jsonl > results.jsonl

  # one row per photo: the photo and its overlay under each of the five CAM methods
  .venv/bin/gradcam-explain tests/data/chelsea.jpg --gallery gallery.png

  # another server or model
  .venv/bin/gradcam-explain cat.jpg --url http://10.0.0.5:8080 --model resnet18_10 --token "$TOKEN"
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from handler.tools.camclient import Client, Fatal, Result, token_attached
from handler.vocab import REQUEST_METHODS

ROOT = Path(__file__).resolve().parents[2]
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
CAM_METHODS = ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam")
OUTPUT_FORMS = ("map", "heatmap", "overlay")
_PICTURES = {"heatmap": "png", "overlay": "jpg"}


# ---------------------------------------------------------------------------- inputs


def find_photos(targets: list[Path], skip: Path | None) -> tuple[list[Path], list[str]]:
    """Files to send, in order and without duplicates, and complaints about folders with none.

    Files named directly are kept whatever they are; folders contribute their image files.
    """
    photos: list[Path] = []
    seen: set[Path] = set()
    empty: list[str] = []
    skip = skip.resolve() if skip else None

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            photos.append(path)

    for target in targets:
        if not target.is_dir():
            add(target)  # missing or unreadable: sent nowhere, reported on its line
            continue
        found = 0
        for folder, dirs, files in os.walk(target):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and Path(folder, d).resolve() != skip)
            for name in sorted(files):
                if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                    add(Path(folder, name))
                    found += 1
        if not found:
            empty.append(str(target))
    return photos, empty


def output_names(photos: list[Path]) -> dict[Path, str]:
    """The file-name stem of each photo's outputs: its own stem, or stem-<hash> when shared."""
    counts = Counter(p.stem.casefold() for p in photos)
    names = {}
    for p in photos:
        if counts[p.stem.casefold()] == 1:
            names[p] = p.stem
        else:
            names[p] = f"{p.stem}-{hashlib.sha1(str(p.resolve()).encode()).hexdigest()[:8]}"
    return names


def _config(key: str) -> str | None:
    path = ROOT / "config.properties"
    if path.exists():
        for text in path.read_text().splitlines():
            if text.startswith(key + "="):
                return text.split("=", 1)[1].strip()
    return None


def _token(args: argparse.Namespace) -> tuple[str | None, str]:
    """The inference token and where it came from (or why there is none)."""
    if args.token is not None:
        return (args.token, "--token") if args.token else (None, "--token ''")
    if os.environ.get("GRADCAM_TOKEN"):
        return os.environ["GRADCAM_TOKEN"], "$GRADCAM_TOKEN"
    key_file = ROOT / "key_file.json"
    if key_file.exists():
        try:
            return json.loads(key_file.read_text())["inference"]["key"], str(key_file)
        except (ValueError, KeyError, TypeError) as exc:
            raise Fatal(f"{key_file} has no inference key ({exc!r}); pass --token") from exc
    return None, f"{key_file} does not exist (`make serve` writes it when it starts the server); pass --token"


# ---------------------------------------------------------------------------- outputs


def _label_probability(body: dict) -> tuple[str, float]:
    top = body["predictions"][0]
    return str(top.get("label", top["class_id"])), float(top["probability"])


def save(result: Result, photo: Path, name: str, out: Path) -> list[str]:
    """Write NAME.json and the pictures of a result under ``out``; the file names written."""
    written: list[str] = []
    body = json.loads(json.dumps(result.body)) if result.body is not None else {}
    for cam in body.get("cams", []) if result.ok else []:
        for form, ext in _PICTURES.items():
            if isinstance(cam.get(form), str):
                data = base64.b64decode(cam.pop(form))
                if form == "overlay" and data.startswith(b"\x89PNG"):
                    ext = "png"
                file = f"{name}.{cam.get('class_id', 'cam')}.{form}.{ext}"
                (out / file).write_bytes(data)
                cam[f"{form}_file"] = file
                written.append(file)
    body["client"] = {"source": str(photo), "status": result.status, "ok": result.ok,
                      "latency_ms": round(result.latency_ms, 1), "attempts": result.attempts}
    if not result.ok:
        body["client"]["error"] = result.error
    (out / f"{name}.json").write_text(json.dumps(body) + "\n")
    return [f"{name}.json", *written]


def record(result: Result, photo: Path, files: list[str]) -> dict:
    """The machine-readable summary of one photo (--jsonl lines, index.jsonl)."""
    entry: dict = {"file": str(photo), "ok": result.ok, "status": result.status}
    if result.ok:
        label, probability = _label_probability(result.body)
        entry.update(label=label, probability=probability, latency_ms=round(result.latency_ms, 1))
    else:
        entry["error"] = result.error
        if result.body and "error" in result.body:
            entry.update(kind=result.body["error"], field=result.body.get("field"))
    entry.update(attempts=result.attempts, outputs=files)
    return entry


def line(result: Result, photo: Path) -> str:
    """The tab-separated stdout line of one photo."""
    clean = str(photo).replace("\t", " ")
    if result.ok:
        label, probability = _label_probability(result.body)
        text = f"{clean}\tok\t{label}\t{probability:.4f}\t{result.latency_ms:.0f} ms"
        cams = (result.body or {}).get("cams") or [{}]
        quality = cams[0].get("quality")
        if quality:
            text += f"\tkept {quality['kept_confidence']:.2f} removed {quality['removed_confidence']:.2f}"
        return text
    status = "-" if result.status is None else str(result.status)
    return f"{clean}\terror\t{status}\t" + " ".join(str(result.error).split())


class Progress:
    """A one-line progress bar on stderr (redrawn in place on a terminal, else every 5 %)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()
        self.done = self.failed = 0
        self._last_step = -1

    def _text(self) -> str:
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        filled = int(24 * self.done / max(self.total, 1))
        return (f"[{'#' * filled}{'.' * (24 - filled)}] {self.done}/{self.total} photos, {self.failed} failed, "
                f"{rate:.1f}/s, eta {eta:.0f} s")

    def clear(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\r\033[K")

    def update(self, ok: bool | None = None) -> None:
        """Count one more photo (``None``: count nothing, just draw) and redraw when due."""
        if ok is not None:
            self.done += 1
            self.failed += not ok
        if not self.enabled:
            return
        if self.tty:
            sys.stderr.write("\r\033[K" + self._text())
            sys.stderr.flush()
        elif (step := 20 * self.done // max(self.total, 1)) != self._last_step or self.done == self.total:
            self._last_step = step
            print(f"[explain] {self._text()}", file=sys.stderr, flush=True)

    def finish(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


# ---------------------------------------------------------------------------- run


def _fields(args: argparse.Namespace, method: str | None, outputs: list[str]) -> dict[str, str]:
    fields = {"outputs": ",".join(outputs)}
    if args.topk is not None:
        fields["topk"] = str(args.topk)
    if args.cam_classes is not None:
        fields["cam_classes"] = args.cam_classes
    if method is not None:
        fields["cam_method"] = method
    if args.quality:
        fields["quality"] = "true"
    return fields


def _combine(results: dict[str | None, Result], primary: str | None) -> Result:
    """A gallery photo's result: its primary method's answer, failed when any method failed."""
    main = results[primary]
    failed = [(m, r) for m, r in results.items() if not r.ok and m != primary]
    if main.ok and failed:
        method, bad = failed[0]
        return Result(status=bad.status, body=bad.body, error=f"{method}: {bad.error}",
                      latency_ms=main.latency_ms, attempts=main.attempts)
    return main


@dataclass
class _Tally:
    """What the summary line reports."""

    photos: int
    outcomes: Counter = field(default_factory=Counter)  # "ok", an HTTP status, or "no answer"
    retried: Counter = field(default_factory=Counter)  # why requests were sent again

    @property
    def failed(self) -> int:
        return sum(n for k, n in self.outcomes.items() if k != "ok")

    def summary(self, out: Path) -> str:
        errors = ", ".join(f"{k}: {n}" for k, n in sorted(self.outcomes.items()) if k != "ok")
        again = ", ".join(f"{k}: {n}" for k, n in sorted(self.retried.items()))
        return (f"{self.photos} photos: {self.outcomes['ok']} ok, {self.failed} failed"
                + (f" ({errors})" if errors else "") + f"; {sum(self.retried.values())} retries"
                + (f" ({again})" if again else "") + f"; outputs in {out}/")


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    photos, empty = find_photos(args.inputs, out)
    for folder in empty:
        print(f"[explain] no image files in {folder} (looked for {' '.join(sorted(IMAGE_EXTENSIONS))})",
              file=sys.stderr)
    if not photos:
        print("[explain] error: nothing to send", file=sys.stderr)
        return 2
    token, token_source = _token(args)
    client = Client(args.url, args.model, token, args.retries, args.timeout)
    try:
        warning = client.ping(token_source)
    except Fatal as exc:
        message = str(exc)
        if token is None and "refused the token" in message:
            message = f"the server at {args.url} wants a token and none was sent: {token_source}"
        print(f"[explain] error: {message}", file=sys.stderr)
        return 2
    if warning and not args.quiet:
        print(f"[explain] warning: {warning}", file=sys.stderr)

    outputs = list(args.outputs)
    methods: list[str | None] = [args.cam_method]
    if args.gallery:  # the primary method first: its answer is the one saved and printed
        args.cam_method = args.cam_method or "gradcam"
        methods = [args.cam_method, *(m for m in CAM_METHODS if m != args.cam_method)]
        if "overlay" not in outputs:
            outputs.append("overlay")
    out.mkdir(parents=True, exist_ok=True)
    names = output_names(photos)
    show = args.progress if args.progress is not None else sys.stderr.isatty() and len(photos) > 8
    progress = Progress(len(photos), show and not args.quiet)
    tally = _Tally(len(photos))
    progress.update()
    answers: dict[Path, dict[str | None, Result]] = {p: {} for p in photos}
    rows: dict[Path, list] = {}
    fatal: Fatal | None = None
    with open(out / "index.jsonl", "w") as index, ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        futures: dict[Future, tuple[Path, str | None]] = {
            pool.submit(client.explain, photo, _fields(args, method, outputs)): (photo, method)
            for photo in photos for method in methods
        }
        remaining = set(futures)
        while remaining and not fatal:
            finished, remaining = wait(remaining, return_when=FIRST_COMPLETED)
            for future in finished:
                photo, method = futures[future]
                try:
                    answers[photo][method] = future.result()
                except Fatal as exc:
                    fatal = fatal or exc
                if fatal or client.stop.is_set() or len(answers[photo]) < len(methods):
                    continue  # stopping: a fatal answer is on its way; no line for skipped photos
                results = answers.pop(photo)
                tally.retried.update(r for res in results.values() for r in res.retried.elements())
                files = save(results[args.cam_method], photo, names[photo], out)
                result = _combine(results, args.cam_method) if args.gallery else results[method]
                if args.gallery:
                    from handler.tools.gallery import gallery_row

                    rows[photo] = gallery_row(photo, results, methods, args.panel)
                entry = record(result, photo, files)
                tally.outcomes["ok" if result.ok else str(result.status or "no answer")] += 1
                index.write(json.dumps(entry) + "\n")
                progress.clear()
                print(json.dumps(entry) if args.jsonl else line(result, photo), flush=True)
                progress.update(result.ok)
        if fatal:
            pool.shutdown(wait=True, cancel_futures=True)
    progress.finish()
    if fatal:
        print(f"[explain] error: {fatal}", file=sys.stderr)
        return 2
    if args.gallery:
        from handler.tools.gallery import draw_gallery

        args.gallery.parent.mkdir(parents=True, exist_ok=True)
        draw_gallery([rows[p] for p in photos if p in rows], args.panel).save(args.gallery, optimize=True)
        if not args.quiet:
            print(f"[explain] gallery: {args.gallery} ({len(rows)} rows of {1 + len(methods)} panels)",
                  file=sys.stderr)
    if not args.quiet:
        print(f"[explain] {tally.summary(out)}", file=sys.stderr)
    return 1 if tally.failed else 0


def _outputs(text: str) -> list[str]:
    forms = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in forms if f not in OUTPUT_FORMS]
    if not forms or unknown:
        raise argparse.ArgumentTypeError(f"use a comma list of {', '.join(OUTPUT_FORMS)}; got {text!r}")
    return forms


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    doc = __doc__.split("examples:")
    p = argparse.ArgumentParser(prog="explain.py", description=doc[0], epilog="examples:" + doc[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", type=Path, metavar="IMAGE_OR_DIR", help="photos and folders of photos")
    server = p.add_argument_group("server")
    server.add_argument("--url", default=_config("inference_address") or "http://127.0.0.1:8080",
                        help="inference address (default: inference_address in config.properties, %(default)s)")
    server.add_argument("--model", default="efficientnet_lite0", help="served model name (default: %(default)s)")
    server.add_argument("--token", default=None,
                        help="inference token (default: $GRADCAM_TOKEN, else key_file.json in the repo root, "
                             "which `make serve` writes; '' sends none)")
    opts = p.add_argument_group("request options (sent as headers, or multipart fields where a value does not fit "
                                "a header; unset ones take the archive's defaults)")
    opts.add_argument("--topk", type=_positive, default=None, help="predictions to return (server default 5)")
    opts.add_argument("--cam-classes", default=None,
                      help="top1, topN, none, or a comma list of class ids/labels, e.g. '285,tabby' (default top1)")
    opts.add_argument("--cam-method", choices=REQUEST_METHODS, default=None,
                      help="CAM method (default gradcam; chefer, legrad: attention maps, for timm ViT/DeiT/Eva and "
                           "torchvision ViT archives)")
    opts.add_argument("--quality", action="store_true",
                      help="ask for each map's faithfulness score (the server runs one more forward pass); "
                           "the line gets the first map's kept and removed confidence")
    opts.add_argument("--outputs", type=_outputs, default=["map", "overlay"],
                      help="comma list of map, heatmap, overlay (default: map,overlay; map stays in the JSON)")
    run_group = p.add_argument_group("run")
    run_group.add_argument("--out", type=Path, default=Path("explain-out"),
                           help="folder for the JSON answers and pictures (default: %(default)s)")
    run_group.add_argument("--concurrency", type=_positive, default=8,
                           help="requests in flight (default %(default)s: a full server batch)")
    run_group.add_argument("--retries", type=int, default=4,
                           help="retries per request after a 503/507 or a dropped connection (default %(default)s)")
    run_group.add_argument("--timeout", type=float, default=120.0,
                           help="seconds to wait for one answer (default %(default)g)")
    run_group.add_argument("--jsonl", action="store_true", help="print one JSON object per photo instead of a line")
    run_group.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                           help="progress bar on stderr (default: when stderr is a terminal and there are many)")
    run_group.add_argument("-q", "--quiet", action="store_true", help="no summary, warnings or progress on stderr")
    gal = p.add_argument_group("gallery")
    gal.add_argument("--gallery", type=Path, default=None, metavar="FILE.png",
                     help="also draw one row per photo: the photo and its overlay under each of the five methods, "
                          "as PNG (or JPEG for a .jpg name) "
                          "(five requests per photo; files are written for --cam-method, default gradcam)")
    gal.add_argument("--panel", type=_positive, default=224, help="gallery panel size in pixels (default %(default)s)")
    args = p.parse_args(token_attached(argv))
    if args.retries < 0:
        p.error("--retries must be 0 or more")
    if args.gallery and args.gallery.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        p.error(f"--gallery {args.gallery}: name a .png (or .jpg, .webp) file")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except Fatal as exc:
        print(f"[explain] error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\n[explain] interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
