"""Every vocabulary of the product, defined once: the request parser, the config, the engine, the
archiver, the clients and the docs read these tuples. Plain Python: no import at all, so a client
can read them without torch.
"""

from __future__ import annotations

__all__ = [
    "CAM_METHODS",
    "ATTENTION_METHODS",
    "REQUEST_METHODS",
    "METHOD_ALIASES",
    "OUTPUT_FORMS",
    "OPTION_NAMES",
    "TRUE_WORDS",
    "FALSE_WORDS",
    "QUALITY_KEYS",
    "LAYOUTS",
    "SWITCHES",
    "PRECISIONS",
    "RESIZE_MODES",
    "INTERPOLATIONS",
    "CODEC_DEVICES",
    "COMPILE_BATCH_MODES",
    "COMPILE_STARTS",
]

#: CAM methods a request may ask for (``cam_method``); the engine has one unit per name.
CAM_METHODS = ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam")
#: Transformer-native methods from attention probabilities (handler.attention_cam): timm ViT/Eva, torchvision ViT.
ATTENTION_METHODS = ("chefer", "legrad")
#: Every ``cam_method`` a request may name.
REQUEST_METHODS = CAM_METHODS + ATTENTION_METHODS
#: Other spellings accepted for a method.
METHOD_ALIASES = {"gradcampp": "gradcam++"}
#: Output forms of a map (``outputs``), in the order a response lists them.
OUTPUT_FORMS = ("map", "heatmap", "overlay")
#: Per-request options: multipart fields, JSON keys, headers, v2 parameters or inputs.
OPTION_NAMES = ("topk", "cam_classes", "cam_method", "outputs", "quality")
#: Spellings of a boolean option (``quality``), case-insensitive.
TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")
#: The numbers of a map's ``quality`` object (``quality=true``), in the order the engine computes them.
QUALITY_KEYS = ("confidence", "kept_confidence", "drop", "increase", "removed_confidence", "removed_drop",
                "fraction")

#: A target layer's output layout (``auto``: detected when the model loads).
LAYOUTS = ("auto", "nchw", "nhwc", "nlc")
#: Switches the archiver may resolve by timing (``auto``).
SWITCHES = ("auto", "on", "off")
#: Autocast precisions on accelerators.
PRECISIONS = ("fp32", "bf16", "fp16")
#: How an image is fitted to the model input; nothing is ever cropped away.
RESIZE_MODES = ("squash", "letterbox")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
#: Where JPEGs are decoded and encoded.
CODEC_DEVICES = ("auto", "cpu", "cuda")
#: How a compiled model meets batch sizes: padded to buckets, or a dynamic batch dimension.
COMPILE_BATCH_MODES = ("buckets", "dynamic")
#: When a compiled archive compiles: in the background while the eager model serves (ready at
#: once), or at load (ready once compiled).
COMPILE_STARTS = ("background", "load")
