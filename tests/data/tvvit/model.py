"""torchvision's VisionTransformer at test size: vit_b_16's layout (16 px patches, one class
token, 14x14 grid at 224 px) with 2 layers of width 64 instead of 12 of width 768."""

from torchvision.models import VisionTransformer


class SmallViT(VisionTransformer):
    def __init__(self, num_classes: int = 1000, image_size: int = 224) -> None:
        super().__init__(image_size=image_size, patch_size=16, num_layers=2, num_heads=4, hidden_dim=64,
                         mlp_dim=128, num_classes=num_classes)
