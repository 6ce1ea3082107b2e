"""Tests of handler.codec and handler.options: request forms and option validation (image decoding: test_images.py)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from handler.codec import extract_request
from handler.errors import InvalidInput, InvalidOption
from handler.limits import RequestLimits
from handler.options import CamSelection, LabelIndex, Options, parse_defaults, parse_options
from handler.requests import RawRequest
from handler.vocab import CAM_METHODS, OPTION_NAMES, OUTPUT_FORMS

DATA = Path(__file__).parent / "data"
LABELS = [
    "tench, Tinca tinca",
    "goldfish, Carassius auratus",
    "crane",
    "tabby, tabby cat",
    "Egyptian cat",
    "crane",
    "tiger cat",
    "Cardigan, Cardigan Welsh corgi",
    "cardigan",
    "tiger, Panthera tigris",
]
NUM_CLASSES = len(LABELS)
LIMITS = RequestLimits()




@pytest.fixture
def labels() -> LabelIndex:
    return LabelIndex(LABELS, NUM_CLASSES)


def _parse(raw: dict, labels: LabelIndex | None = None, **limits) -> Options:
    index = labels or LabelIndex(LABELS, NUM_CLASSES)
    return parse_options(raw, Options(), index, NUM_CLASSES, RequestLimits(**limits))


def _rejects(raw: dict, field: str, match: str, labels: LabelIndex | None = None) -> None:
    with pytest.raises(InvalidOption, match=match) as info:
        _parse(raw, labels)
    assert info.value.field == field
    assert info.value.status == 400


# --- extract_request -------------------------------------------------------------------------


def test_public_constants():
    assert OPTION_NAMES == ("topk", "cam_classes", "cam_method", "outputs", "quality")
    assert CAM_METHODS == ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam")
    assert OUTPUT_FORMS == ("map", "heatmap", "overlay")
    assert Options() == Options(5, CamSelection("top", 1, ()), "gradcam", ("map",), False)


@pytest.mark.parametrize("key", ["body", "data"])
def test_raw_body(png, key):
    request = extract_request({key: png}, {})
    assert request == RawRequest(png, {}, "raw")


def test_raw_body_bytearray_and_no_headers(png):
    assert extract_request({"body": bytearray(png)}, None) == RawRequest(png, {}, "raw")


def test_raw_body_options_from_headers(png):
    headers = {
        "TopK": " 3 ",
        "CAM_Method": "layercam",
        "outputs": "overlay,map",
        "Content-Type": "image/png",
        "X-Request-Id": "abc",
        "Authorization": "secret",
    }
    request = extract_request({"body": png}, headers)
    assert request.options == {"topk": "3", "cam_method": "layercam", "outputs": "overlay,map"}
    assert request.image_bytes == png
    assert request.source == "raw"


def test_json_dict_body(png):
    body = {"image": base64.b64encode(png).decode(), "topk": 3, "outputs": ["map", "overlay"]}
    request = extract_request({"body": body}, {"Content-Type": "application/json"})
    assert request == RawRequest(png, {"topk": 3, "outputs": ["map", "overlay"]}, "json")


@pytest.mark.parametrize("as_str", [False, True])
def test_json_as_bytes_or_text(png, as_str):
    text = "  \n" + json.dumps({"image": base64.b64encode(png).decode(), "cam_classes": [1, 2]})
    body = text if as_str else text.encode()
    request = extract_request({"body": body}, {})
    assert request == RawRequest(png, {"cam_classes": [1, 2]}, "json")


def test_json_data_url_with_newlines(png):
    encoded = base64.b64encode(png).decode()
    wrapped = "\n".join(encoded[i : i + 60] for i in range(0, len(encoded), 60))
    body = {"image": "data:image/png;base64," + wrapped}
    assert extract_request({"body": body}, {}).image_bytes == png


def test_json_urlsafe_base64_without_padding():
    payload = bytes(range(256)) * 3 + b"\xfb\xff"
    encoded = base64.urlsafe_b64encode(payload).decode().rstrip("=")
    assert "-" in encoded or "_" in encoded
    assert extract_request({"body": {"image": encoded}}, {}).image_bytes == payload


def test_body_options_win_over_headers(png):
    body = {"image": base64.b64encode(png).decode(), "topk": 4}
    request = extract_request({"body": body}, {"topk": "2", "cam_method": "hirescam"})
    assert request.options == {"topk": 4, "cam_method": "hirescam"}


def test_multipart_str_and_bytes_fields(png):
    item = {"image": png, "topk": b" 3 ", "outputs": "overlay ", "CAM_CLASSES": "tabby"}
    request = extract_request(item, {"cam_method": "xgradcam"})
    assert request == RawRequest(
        png,
        {"cam_method": "xgradcam", "topk": "3", "outputs": "overlay", "cam_classes": "tabby"},
        "multipart",
    )


@pytest.mark.parametrize("alias", ["file", "data"])
def test_multipart_image_aliases(png, alias):
    request = extract_request({alias: png, "topk": "1"}, {})
    assert request == RawRequest(png, {"topk": "1"}, "multipart")


def test_multipart_image_as_base64_text(png):
    request = extract_request({"image": base64.b64encode(png).decode(), "topk": "2"}, {})
    assert request.image_bytes == png


@pytest.mark.parametrize("item", [{"body": b""}, {"body": None}, {}, {"body": ""}])
def test_empty_body(item):
    with pytest.raises(InvalidInput, match="empty request body") as info:
        extract_request(item, {})
    assert (info.value.field, info.value.status) == ("body", 400)


def test_text_body():
    with pytest.raises(InvalidInput, match="text, not an image") as info:
        extract_request({"body": "a picture of a cat"}, {"Content-Type": "text/plain"})
    assert info.value.field == "body"


@pytest.mark.parametrize("body", [b'{"image": "abc"', '{"image": }', b"{\xff\xfe}"])
def test_invalid_json(body):
    with pytest.raises(InvalidInput, match="JSON") as info:
        extract_request({"body": body}, {})
    assert (info.value.field, info.value.status) == ("body", 400)


def test_json_error_names_the_position():
    with pytest.raises(InvalidInput, match=r"not valid JSON: .*line 1 column"):
        extract_request({"body": b'{"image": "abc",}'}, {})


@pytest.mark.parametrize("body", [{"topk": 3}, {"image": 5}, {"image": "  "}, b'{"img": "x"}'])
def test_json_without_image(body):
    with pytest.raises(InvalidInput, match="'image' as a base64 string") as info:
        extract_request({"body": body}, {})
    assert info.value.field == "image"


def test_json_without_image_names_the_keys():
    with pytest.raises(InvalidInput, match=r"keys received: img, topk"):
        extract_request({"body": {"img": "x", "topk": 1}}, {})


@pytest.mark.parametrize(
    ("body", "kind"), [([1, 2], "list"), (5, "int"), (b"[1, 2]", "list"), ("[]", "list")]
)
def test_non_dict_json(body, kind):
    with pytest.raises(InvalidInput, match=f"must be an object.*got {kind}") as info:
        extract_request({"body": body}, {})
    assert info.value.field == "body"


@pytest.mark.parametrize("image", ["abc$%^&", "a", "data:image/png,abc", "===="])
def test_invalid_base64(image):
    with pytest.raises(InvalidInput) as info:
        extract_request({"body": {"image": image}}, {})
    assert (info.value.field, info.value.status) == ("image", 400)
    assert "base64" in info.value.message or "empty" in info.value.message


def test_unknown_option_in_json(png):
    body = {"image": base64.b64encode(png).decode(), "top_k": 3}
    with pytest.raises(InvalidOption, match="unknown option 'top_k'.*topk, cam_classes") as info:
        extract_request({"body": body}, {})
    assert (info.value.field, info.value.status) == ("top_k", 400)


def test_unknown_option_in_multipart(png):
    with pytest.raises(InvalidOption, match="unknown option 'colour'") as info:
        extract_request({"image": png, "colour": b"red"}, {})
    assert info.value.field == "colour"


def test_unknown_headers_are_ignored(png):
    request = extract_request({"body": png}, {"top_k": "3", "X-Outputs": "map"})
    assert request.options == {}


def test_multipart_without_image():
    with pytest.raises(
        InvalidInput, match=r"no 'image' field \(fields received: topk, outputs\)"
    ) as info:
        extract_request({"topk": b"3", "outputs": b"map"}, {})
    assert (info.value.field, info.value.status) == ("image", 400)


def test_multipart_with_two_images(png):
    with pytest.raises(InvalidInput, match="several image fields") as info:
        extract_request({"image": png, "file": png}, {})
    assert info.value.field == "image"


def test_multipart_non_utf8_option(png):
    with pytest.raises(InvalidOption, match="not UTF-8") as info:
        extract_request({"image": png, "outputs": b"\xff\xfe"}, {})
    assert info.value.field == "outputs"


# --- LabelIndex ------------------------------------------------------------------------------


def test_label_index_resolves_ids_and_synonyms(labels):
    assert labels.resolve("7") == 7
    assert labels.resolve(" 0 ") == 0
    assert labels.resolve("tabby") == 3
    assert labels.resolve("TABBY CAT") == 3
    assert labels.resolve("tabby,tabby   cat") == 3
    assert labels.resolve("Panthera tigris") == 9


def test_label_index_ambiguous(labels):
    with pytest.raises(InvalidOption, match="'crane' is ambiguous: it names classes 2, 5") as info:
        labels.resolve("crane")
    assert info.value.field == "cam_classes"


def test_label_index_unknown_suggests(labels):
    with pytest.raises(InvalidOption, match="unknown class name 'tabbby'; did you mean 'tabby'"):
        labels.resolve("tabbby")


@pytest.mark.parametrize("token", ["10", "-1", "99999999999999999999999"])
def test_label_index_id_out_of_range(labels, token):
    with pytest.raises(InvalidOption, match="out of range; ids go from 0 to 9") as info:
        labels.resolve(token)
    assert (info.value.field, info.value.status) == ("cam_classes", 400)


def test_label_index_without_names():
    index = LabelIndex(None, 4)
    assert index.resolve("3") == 3
    with pytest.raises(InvalidOption, match="no class names, ids go from 0 to 3"):
        index.resolve("cat")


def test_label_index_length_mismatch():
    with pytest.raises(ValueError, match="3 names but the model has 4 classes"):
        LabelIndex(["a", "b", "c"], 4)


# --- parse_options ---------------------------------------------------------------------------


def test_missing_options_keep_defaults(labels):
    defaults = Options(topk=2, cam_classes=CamSelection("none"), outputs=("overlay",))
    assert parse_options({}, defaults, labels, NUM_CLASSES, LIMITS) == defaults
    assert parse_options({"topk": None}, defaults, labels, NUM_CLASSES, LIMITS) == defaults
    parsed = parse_options({"topk": "4"}, defaults, labels, NUM_CLASSES, LIMITS)
    assert parsed == Options(4, CamSelection("none"), "gradcam", ("overlay",))


@pytest.mark.parametrize(("value", "expected"), [(3, 3), ("3", 3), (" 3 ", 3), ("10", 10)])
def test_topk_valid(value, expected):
    assert _parse({"topk": value}).topk == expected


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (True, "must be an integer, got True"),
        (2.5, "must be an integer, got 2.5"),
        ("abc", "must be an integer, got 'abc'"),
        ("3.0", "must be an integer"),
        (0, "between 1 and 10, got 0"),
        ("-2", "between 1 and 10, got -2"),
        (11, "between 1 and 10, got 11"),
        ("1" * 40, "between 1 and 10"),
    ],
)
def test_topk_invalid(value, match):
    _rejects({"topk": value}, "topk", match)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("top1", CamSelection("top", 1)),
        (" TOP3 ", CamSelection("top", 3)),
        ("top5", CamSelection("top", 5)),
        ("none", CamSelection("none")),
        ("3", CamSelection("ids", class_ids=(3,))),
        ("3, 1,3", CamSelection("ids", class_ids=(3, 1))),
        (4, CamSelection("ids", class_ids=(4,))),
        ([0, "goldfish", "1"], CamSelection("ids", class_ids=(0, 1))),
        ("Tabby Cat", CamSelection("ids", class_ids=(3,))),
        ("tabby, tabby cat", CamSelection("ids", class_ids=(3,))),
        ("tabby, tabby cat, tiger cat", CamSelection("ids", class_ids=(3, 6))),
        ("Cardigan, Cardigan Welsh corgi", CamSelection("ids", class_ids=(7,))),
        ("Cardigan Welsh corgi, 0", CamSelection("ids", class_ids=(7, 0))),
        (["tench, Tinca tinca", 2], CamSelection("ids", class_ids=(0, 2))),
        ("0,0,0,0,0,0,1", CamSelection("ids", class_ids=(0, 1))),
    ],
)
def test_cam_classes_valid(value, expected):
    assert _parse({"cam_classes": value}).cam_classes == expected


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("top6", "asks for 6 CAMs; at most 5 per request"),
        ("top0", r"topN needs N in 1\.\.10"),
        ("top11", r"topN needs N in 1\.\.10"),
        ("crane", "ambiguous: it names classes 2, 5"),
        ("cardigan", "ambiguous: it names classes 7, 8"),
        ("tabby, crane", "ambiguous"),
        ("tabbby", "did you mean 'tabby'"),
        ("10", "out of range; ids go from 0 to 9"),
        ([1, -1], "out of range"),
        ("0,1,2,3,4,6", "more than 5 classes"),
        ("", "empty"),
        ("   ", "empty"),
        ([], "empty"),
        ("1,,2", "empty class entry"),
        (True, "must be a string, id or list"),
        (2.0, "must be a string, id or list"),
        ([1, [2]], "entries must be ids or names"),
        (",".join(["1"] * 101), "101 entries, too many for 5 CAMs"),
        ([1] * 101, "101 entries"),
    ],
)
def test_cam_classes_invalid(value, match):
    _rejects({"cam_classes": value}, "cam_classes", match)


def test_cam_classes_max_cams_is_configurable(labels):
    assert _parse({"cam_classes": "top2"}, labels, max_cams=2).cam_classes.count == 2
    with pytest.raises(InvalidOption, match="at most 2 per request"):
        _parse({"cam_classes": "top3"}, labels, max_cams=2)
    with pytest.raises(InvalidOption, match="more than 2 classes"):
        _parse({"cam_classes": "0,1,2"}, labels, max_cams=2)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("gradcam", "gradcam"),
        ("GradCAM++", "gradcam++"),
        ("gradcampp", "gradcam++"),
        (" LayerCAM ", "layercam"),
        ("HiResCAM", "hirescam"),
        ("xgradcam", "xgradcam"),
    ],
)
def test_cam_method_valid(value, expected):
    assert _parse({"cam_method": value}).cam_method == expected


@pytest.mark.parametrize("value", ["scorecam", "", 3, ["gradcam"]])
def test_cam_method_invalid(value):
    match = r"unknown cam_method .*use one of gradcam, gradcam\+\+, xgradcam, layercam, hirescam"
    _rejects({"cam_method": value}, "cam_method", match)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("overlay, MAP", ("map", "overlay")),
        (["heatmap", "map", "map"], ("map", "heatmap")),
        ("overlay,heatmap,map", ("map", "heatmap", "overlay")),
        (" Heatmap ", ("heatmap",)),
    ],
)
def test_outputs_valid(value, expected):
    assert _parse({"outputs": value}).outputs == expected


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("map,blur", "unknown outputs 'blur'; allowed: map, heatmap, overlay"),
        (["map", 3], "unknown outputs '3'"),
        ("map,,overlay", "unknown outputs ''"),
        ("", "outputs is empty"),
        (" , ", "outputs is empty"),
        ([], "outputs is empty"),
        (5, "must be a string or list"),
    ],
)
def test_outputs_invalid(value, match):
    _rejects({"outputs": value}, "outputs", match)


def test_parse_options_unknown_name():
    _rejects({"colour": "red"}, "colour", "unknown option 'colour'")


def test_parse_options_from_extracted_headers(png, labels):
    headers = {"TopK": "2", "Cam_Classes": "tabby, tabby cat, 0", "Outputs": "overlay,map"}
    request = extract_request({"body": png}, headers)
    options = parse_options(request.options, Options(), labels, NUM_CLASSES, LIMITS)
    assert options == Options(
        2, CamSelection("ids", class_ids=(3, 0)), "gradcam", ("map", "overlay")
    )


# --- parse_defaults --------------------------------------------------------------------------


def test_parse_defaults_missing_keys(labels):
    assert parse_defaults({}, labels, NUM_CLASSES, LIMITS) == Options()
    assert parse_defaults({"batch_size": 8}, labels, NUM_CLASSES, LIMITS) == Options()


def test_parse_defaults_caps_topk_for_small_models():
    assert parse_defaults({}, LabelIndex(None, 3), 3, LIMITS).topk == 3


def test_parse_defaults_values(labels):
    config = {"topk": "3", "cam_classes": "top2", "cam_method": "XGradCAM", "outputs": ["overlay"]}
    expected = Options(3, CamSelection("top", 2), "xgradcam", ("overlay",))
    assert parse_defaults(config, labels, NUM_CLASSES, LIMITS) == expected


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"topk": 0}, "handler config key 'topk': topk must be between 1 and 10"),
        ({"cam_classes": "crane"}, "handler config key 'cam_classes': .*ambiguous"),
        ({"cam_method": "scorecam"}, "handler config key 'cam_method'"),
        ({"outputs": "blur"}, "handler config key 'outputs'"),
    ],
)
def test_parse_defaults_rejects_bad_config(labels, config, match):
    with pytest.raises(ValueError, match=match) as info:
        parse_defaults(config, labels, NUM_CLASSES, LIMITS)
    assert not isinstance(info.value, InvalidOption)
