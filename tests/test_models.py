import re

import pytest
import torch
import torch.nn as nn

from distvgg.models import (
    MODEL_NAMES,
    VGG3Layer,
    build_model,
    conv_output_size,
    count_parameters,
    load_pretrained,
    model_spec,
    save_pretrained,
)

# The block the quick guide prints for print(VGG3Layer(num_classes=10)), verbatim.
GUIDE_PRINT = """\
VGG3Layer(
  (features): Sequential(
    (0): Conv2d(3, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
    (1): BatchNorm2d(64, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)
    (2): ReLU(inplace=True)
    (3): MaxPool2d(kernel_size=2, stride=2, padding=0, dilation=1, ceil_mode=False)
    (4): Conv2d(64, 128, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
    (5): BatchNorm2d(128, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)
    (6): ReLU(inplace=True)
    (7): MaxPool2d(kernel_size=2, stride=2, padding=0, dilation=1, ceil_mode=False)
    (8): Conv2d(128, 256, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
    (9): BatchNorm2d(256, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)
    (10): ReLU(inplace=True)
    (11): MaxPool2d(kernel_size=2, stride=2, padding=0, dilation=1, ceil_mode=False)
  )
  (classifier): Sequential(
    (0): Linear(in_features=4096, out_features=4096, bias=True)
    (1): ReLU(inplace=True)
    (2): Dropout(p=0.5, inplace=False)
    (3): Linear(in_features=4096, out_features=4096, bias=True)
    (4): ReLU(inplace=True)
    (5): Dropout(p=0.5, inplace=False)
    (6): Linear(in_features=4096, out_features=10, bias=True)
  )
)"""


class GuideVGG3Layer(nn.Module):
    """The guide's class as written (x.view flatten included)."""

    def __init__(self, num_classes=1000):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels=3, out_channels=64, kernel_size=3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(in_channels=64, out_channels=128, kernel_size=3, padding=1),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(in_channels=128, out_channels=256, kernel_size=3, padding=1),
            nn.BatchNorm2d(256),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(256 * 4 * 4, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x):
        x = self.features(x)
        x = x.view(x.size(0), -1)
        return self.classifier(x)


def torch_neutral(text: str) -> str:
    # torch >= 2.14 adds "bias=True" to BatchNorm reprs; that field is torch's, not the model's.
    return re.sub(r"(BatchNorm2d\(.*affine=True), bias=True", r"\1", text)


def test_repr_is_the_guides_block():
    assert torch_neutral(repr(VGG3Layer(num_classes=10))) == GUIDE_PRINT


def test_guide_state_dict_loads_and_gives_same_outputs():
    torch.manual_seed(0)
    guide = GuideVGG3Layer(num_classes=10).eval()
    ours = VGG3Layer(num_classes=10).eval()
    ours.load_state_dict(guide.state_dict(), strict=True)
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(ours(x), guide(x))
    # channels_last input: the guide's view() would fail, flatten keeps the same features.
    torch.testing.assert_close(ours(x.contiguous(memory_format=torch.channels_last)), guide(x))


@pytest.mark.parametrize("w,k,p,s,out", [(32, 3, 1, 1, 32), (32, 2, 0, 2, 16), (28, 5, 0, 1, 24), (7, 3, 2, 2, 5)])
def test_conv_output_size(w, k, p, s, out):
    assert conv_output_size(w, k, p, s) == out
    # Agrees with what a real conv produces.
    y = nn.Conv2d(1, 1, k, stride=s, padding=p)(torch.zeros(1, 1, w, w))
    assert y.shape[-1] == out


@pytest.mark.parametrize("size", [32, 64, (48, 40)])
def test_classifier_sized_for_input(size):
    m = VGG3Layer(num_classes=7, image_size=size, width=0.25)
    h, w = (size, size) if isinstance(size, int) else size
    assert m(torch.randn(2, 3, h, w)).shape == (2, 7)
    assert m.classifier[0].in_features == 64 * (h // 8) * (w // 8)


def test_too_small_input_is_a_clear_error():
    with pytest.raises(ValueError, match="too small"):
        build_model("vgg11", 10, image_size=16)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_family_forward_and_width(name):
    full = build_model(name, 10)
    tiny = build_model(name, 10, width=0.125)
    assert tiny(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert count_parameters(tiny) < count_parameters(full) / 20
    convs = [m for m in full.features if isinstance(m, nn.Conv2d)]
    assert len(convs) == {"vgg3layer": 3, "vgg11": 8, "vgg13": 10, "vgg16": 13, "vgg19": 16}[name]


def test_vgg3layer_parameter_count_matches_guide():
    assert count_parameters(VGG3Layer(num_classes=10)) == count_parameters(GuideVGG3Layer(num_classes=10))


def test_unknown_model():
    with pytest.raises(ValueError, match="vgg3layer"):
        build_model("resnet", 10)


def test_save_and_load_pretrained_roundtrip(tmp_path):
    m = build_model("vgg11", 5, width=0.125, image_size=32).eval()
    spec = model_spec("vgg11", 5, 0.125, 0.5, (32, 32), ["a", "b", "c", "d", "e"])
    save_pretrained(m, tmp_path / "final", spec)
    loaded, got = load_pretrained(tmp_path / "final")
    assert got["class_names"] == ["a", "b", "c", "d", "e"]
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), m(x))


def test_load_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model weights"):
        load_pretrained(tmp_path)
    m = build_model("vgg3layer", 3, width=0.125)
    save_pretrained(m, tmp_path, model_spec("vgg3layer", 3, 0.125, 0.5, (32, 32), ["x", "y", "z"]))
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])  # truncated
    with pytest.raises(ValueError, match="truncated"):
        load_pretrained(tmp_path)
