"""Options of one request, validated against the archive defaults once the edge has parsed them.

Server-agnostic: the TorchServe handler and the KServe predictor hand the same raw options (from
multipart fields, JSON keys, headers or v2 parameters) to :func:`parse_options`. No server,
torch or PIL import here.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from handler.errors import InvalidOption
from handler.limits import RequestLimits
from handler.vocab import FALSE_WORDS, METHOD_ALIASES, OPTION_NAMES, OUTPUT_FORMS, REQUEST_METHODS, TRUE_WORDS

__all__ = [
    "CamSelection",
    "LabelIndex",
    "Options",
    "parse_defaults",
    "parse_options",
    "unknown_option",
]

_INT = re.compile(r"[+-]?[0-9]+")
_TOP_N = re.compile(r"top\s*([+-]?[0-9]+)")


@dataclass(frozen=True)
class CamSelection:
    """Which classes get a CAM: ``"top"`` (the ``count`` best), ``"ids"`` or ``"none"``."""

    mode: str
    count: int = 1
    class_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Options:
    """Validated per-request options; ``outputs`` is in :data:`OUTPUT_FORMS` order."""

    topk: int = 5
    cam_classes: CamSelection = CamSelection("top", 1)
    cam_method: str = "gradcam"
    outputs: tuple[str, ...] = ("map",)
    quality: bool = False


def _norm(name: str) -> str:
    """Case- and spacing-insensitive key of a label name, commas kept as separators."""
    return ", ".join(" ".join(part.split()) for part in name.lower().split(","))


def _as_int(text: str, too_big: int) -> int:
    return int(text) if len(text) < 19 else too_big  # no slow parse of a huge number


class LabelIndex:
    """Class-name lookup, built once at model load.

    A class answers to its full label (``"tabby, tabby cat"``) and to each comma-separated
    synonym (``"tabby"``, ``"tabby cat"``), case-insensitively.

    Args:
        labels: class names by class id, or None when the model has none.
        num_classes: number of model outputs.

    Raises:
        ValueError: ``num_classes`` is not positive, or ``labels`` has another length.
    """

    def __init__(self, labels: list[str] | None, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if labels is not None and len(labels) != num_classes:
            raise ValueError(
                f"labels has {len(labels)} names but the model has {num_classes} classes"
            )
        self.num_classes = num_classes
        self.max_parts = 1  # most comma-separated parts in one label
        self._ids: dict[str, list[int]] = {}
        self._shown: dict[str, str] = {}
        for class_id, label in enumerate(labels or ()):
            parts = [part.strip() for part in str(label).split(",") if part.strip()]
            self.max_parts = max(self.max_parts, len(parts))
            for name in (str(label), *parts):
                ids = self._ids.setdefault(_norm(name), [])
                if class_id not in ids:
                    ids.append(class_id)
                self._shown.setdefault(_norm(name), name.strip())

    def lookup(self, name: str) -> list[int]:
        """Ids of the classes answering to the name ``name`` (no integer parsing)."""
        return list(self._ids.get(_norm(name), ()))

    def resolve(self, token: str) -> int:
        """Class id of an integer string or of a label name that names one class.

        Raises:
            InvalidOption: the id is out of range, or the name is unknown or ambiguous.
        """
        text, span = str(token).strip(), f"ids go from 0 to {self.num_classes - 1}"
        if not text:
            raise InvalidOption("cam_classes has an empty class entry", "cam_classes")
        if _INT.fullmatch(text):
            class_id = _as_int(text, self.num_classes)
            if not 0 <= class_id < self.num_classes:
                raise InvalidOption(f"class id {text} is out of range; {span}", "cam_classes")
            return class_id
        ids = self.lookup(text)
        if len(ids) == 1:
            return ids[0]
        if ids:
            listed = ", ".join(map(str, ids))
            message = f"class name {text!r} is ambiguous: it names classes {listed}; send an id"
        elif not self._ids:
            message = f"unknown class {text!r}: this model has no class names, {span}"
        else:
            close = difflib.get_close_matches(_norm(text), list(self._ids), n=3)
            hint = ", ".join(repr(self._shown[name]) for name in close)
            message = f"unknown class name {text!r}" + (f"; did you mean {hint}?" if hint else "")
        raise InvalidOption(message, "cam_classes")


def unknown_option(name: str) -> InvalidOption:
    return InvalidOption(f"unknown option {name!r}; allowed: {', '.join(OPTION_NAMES)}", name)


def _parse_int(value: object, name: str, high: int) -> int:
    """Integer in ``1..high`` from an int or a decimal string."""
    if isinstance(value, str) and _INT.fullmatch(value.strip()):
        value = _as_int(value.strip(), high + 1)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidOption(f"{name} must be an integer, got {value!r}", name)
    if not 1 <= value <= high:
        raise InvalidOption(f"{name} must be between 1 and {high}, got {value}", name)
    return value


def _split_names(text: str, labels: LabelIndex) -> list[str]:
    """Split a comma list of ids and names, keeping the longest run of parts that is a label."""
    parts = [part.strip() for part in text.split(",")]
    tokens, start = [], 0
    while start < len(parts):
        stop = start + 1
        for end in range(min(len(parts), start + labels.max_parts), start + 1, -1):
            if labels.lookup(", ".join(parts[start:end])):
                stop = end
                break
        tokens.append(", ".join(parts[start:stop]))
        start = stop
    return tokens


def _parse_cam_classes(
    value: object, labels: LabelIndex, num_classes: int, limits: RequestLimits
) -> CamSelection:
    field, most = "cam_classes", limits.max_cams
    if isinstance(value, bool) or not isinstance(value, (int, str, list, tuple)):
        raise InvalidOption(f"cam_classes must be a string, id or list, got {value!r}", field)
    entries = len(value) if isinstance(value, (list, tuple)) else str(value).count(",") + 1
    if entries > 20 * most:  # bounds the work; duplicates and multi-part names still fit
        raise InvalidOption(f"cam_classes has {entries} entries, too many for {most} CAMs", field)
    if isinstance(value, (list, tuple)):
        if any(isinstance(t, bool) or not isinstance(t, (int, str)) for t in value):
            raise InvalidOption("cam_classes list entries must be ids or names", field)
        tokens = [str(token) for token in value]
    elif isinstance(value, int):
        tokens = [str(value)]
    elif value.strip().lower() == "none":
        return CamSelection("none")
    elif match := _TOP_N.fullmatch(value.strip().lower()):
        count = _as_int(match.group(1), num_classes + 1)
        if not 1 <= count <= num_classes:
            raise InvalidOption(f"cam_classes topN needs N in 1..{num_classes}", field)
        if count > most:
            raise InvalidOption(
                f"cam_classes asks for {count} CAMs; at most {most} per request", field
            )
        return CamSelection("top", count)
    else:
        tokens = _split_names(value.strip(), labels) if value.strip() else []
    if not tokens:
        raise InvalidOption("cam_classes is empty; send topN, none, or class ids/names", field)
    class_ids: list[int] = []
    for token in tokens:
        class_id = labels.resolve(token)
        if class_id not in class_ids:
            class_ids.append(class_id)
        if len(class_ids) > most:
            raise InvalidOption(
                f"cam_classes names more than {most} classes, the most per request", field
            )
    return CamSelection("ids", class_ids=tuple(class_ids))


def _parse_cam_method(value: object) -> str:
    method = value.strip().lower() if isinstance(value, str) else None
    method = METHOD_ALIASES.get(method, method)
    if method not in REQUEST_METHODS:
        message = f"unknown cam_method {value!r}; use one of {', '.join(REQUEST_METHODS)}"
        raise InvalidOption(message, "cam_method")
    return method


def _parse_outputs(value: object) -> tuple[str, ...]:
    allowed = ", ".join(OUTPUT_FORMS)
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, (list, tuple)):
        raise InvalidOption(f"outputs must be a string or list, got {value!r}", "outputs")
    forms = {item.strip().lower() if isinstance(item, str) else repr(item) for item in value}
    if forms <= {""}:
        raise InvalidOption(f"outputs is empty; use some of {allowed}", "outputs")
    unknown = ", ".join(repr(form) for form in sorted(forms) if form not in OUTPUT_FORMS)
    if unknown:
        raise InvalidOption(f"unknown outputs {unknown}; allowed: {allowed}", "outputs")
    return tuple(form for form in OUTPUT_FORMS if form in forms)


def _parse_bool(value: object, name: str) -> bool:
    """A boolean from JSON ``true``/``false``, 0/1, or one of the words of :data:`TRUE_WORDS` and
    :data:`FALSE_WORDS` (multipart fields, headers)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    word = value.strip().lower() if isinstance(value, str) else None
    if word in TRUE_WORDS or word in FALSE_WORDS:
        return word in TRUE_WORDS
    raise InvalidOption(f"{name} must be true or false, got {value!r}", name)


def parse_options(
    raw: dict[str, object],
    defaults: Options,
    labels: LabelIndex,
    num_classes: int,
    limits: RequestLimits,
) -> Options:
    """Validate raw request options; a missing (or JSON null) option keeps its default.

    Args:
        raw: option name to value as received.
        defaults: the archive defaults.
        labels: class-name lookup for ``cam_classes``.
        num_classes: number of model outputs.
        limits: bounds; ``max_cams`` applies here.

    Returns:
        The validated options.

    Raises:
        InvalidOption: an unknown name or a value out of its domain, with ``field`` set.
    """
    values = {name: getattr(defaults, name) for name in OPTION_NAMES}
    for name, value in raw.items():
        if name not in OPTION_NAMES:
            raise unknown_option(name)
        if value is None:
            continue
        if name == "topk":
            values[name] = _parse_int(value, name, num_classes)
        elif name == "cam_classes":
            values[name] = _parse_cam_classes(value, labels, num_classes, limits)
        elif name == "cam_method":
            values[name] = _parse_cam_method(value)
        elif name == "quality":
            values[name] = _parse_bool(value, name)
        else:
            values[name] = _parse_outputs(value)
    return Options(**values)


def parse_defaults(
    config: dict, labels: LabelIndex, num_classes: int, limits: RequestLimits
) -> Options:
    """Archive defaults from the handler config; keys other than the option names are ignored.

    A missing key keeps the :class:`Options` default, with ``topk`` capped at ``num_classes``.

    Raises:
        ValueError: a config value is invalid; the message names the config key.
    """
    raw = {name: value for name, value in (config or {}).items() if name in OPTION_NAMES}
    try:
        return parse_options(raw, Options(topk=min(5, num_classes)), labels, num_classes, limits)
    except InvalidOption as exc:
        raise ValueError(f"handler config key {exc.field!r}: {exc.message}") from exc
