"""tf_efficientnet_lite0 as TorchServe's stock handlers load a model: one class, no arguments."""

import timm
from torch import nn


class EfficientNetLite0(nn.Module):
    """timm's tf_efficientnet_lite0 behind the no-argument constructor the stock handler calls."""

    def __init__(self) -> None:
        super().__init__()
        self.net = timm.create_model("tf_efficientnet_lite0", pretrained=False)

    def forward(self, x):
        return self.net(x)
