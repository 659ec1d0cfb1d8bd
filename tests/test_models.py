import json
import re
import shutil

import pytest
import torch
import torch.nn as nn

from distvgg import models
from distvgg.files import step_folders
from distvgg.models import MODEL_NAMES, ModelLoadError, VGG3Layer, build_model, count_parameters, load_model
from tests.datagen import class_names

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


def test_repr_and_parameter_count_are_the_guides():
    assert torch_neutral(repr(VGG3Layer(num_classes=10))) == GUIDE_PRINT
    assert torch_neutral(repr(GuideVGG3Layer(num_classes=10))) == "Guide" + GUIDE_PRINT
    assert count_parameters(VGG3Layer(num_classes=10)) == count_parameters(GuideVGG3Layer(num_classes=10))


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
    assert models.conv_output_size(w, k, p, s) == out
    # Agrees with what a real conv produces.
    y = nn.Conv2d(1, 1, k, stride=s, padding=p)(torch.zeros(1, 1, w, w))
    assert y.shape[-1] == out


@pytest.mark.parametrize("size", [32, 64, (48, 40)])
def test_classifier_sized_for_input(size):
    m = VGG3Layer(num_classes=7, image_size=size, width=0.25)
    h, w = (size, size) if isinstance(size, int) else size
    assert m(torch.randn(2, 3, h, w)).shape == (2, 7)
    assert m.classifier[0].in_features == 64 * (h // 8) * (w // 8)


def test_too_small_input_or_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="too small"):
        build_model("vgg11", 10, image_size=16)
    with pytest.raises(ValueError, match="vgg3layer"):
        build_model("resnet", 10)


@pytest.mark.parametrize("name", [name for name in MODEL_NAMES if name.startswith("vgg")])
def test_family_forward_and_width(name):
    full = build_model(name, 10)
    tiny = build_model(name, 10, width=0.125)
    assert tiny(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert count_parameters(tiny) < count_parameters(full) / 20
    convs = [m for m in full.features if isinstance(m, nn.Conv2d)]
    assert len(convs) == {"vgg3layer": 3, "vgg11": 8, "vgg13": 10, "vgg16": 13, "vgg19": 16}[name]


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_pretrained_and_load_model_roundtrip(tmp_path):
    m = build_model("vgg11", 5, width=0.125, image_size=(32, 64)).eval()
    spec = models.model_spec("vgg11", 5, 0.125, 0.5, (32, 64), "abcde", mean=0.4, std=0.3)
    models.save_pretrained(m, tmp_path / "final", spec)
    x = torch.randn(2, 3, 32, 64)
    for path in (tmp_path / "final", tmp_path / "final" / "model.safetensors"):
        loaded = load_model(path)
        torch.testing.assert_close(loaded.model(x), m(x))
        assert not loaded.model.training and loaded.weights == tmp_path / "final" / "model.safetensors"
        assert loaded.class_names == list("abcde") and loaded.num_classes == 5 and loaded.image_size == (32, 64)
        assert (loaded.mean, loaded.std, loaded.train_config) == (0.4, 0.3, {})


def test_output_dir_takes_final_then_best_then_the_newest_complete_checkpoint(saved_run, random_model, tmp_path):
    out = shutil.copytree(saved_run, tmp_path / "run")
    step2, step4 = out / "checkpoints" / "step-00000002", out / "checkpoints" / "step-00000004"
    assert same_weights(load_model(out).model, random_model(0)) and load_model(out).weights.parent == out / "final"
    shutil.rmtree(out / "final")
    assert same_weights(load_model(out).model, random_model(1)) and load_model(out).weights.parent == out / "best"
    shutil.rmtree(out / "best")
    notes = []
    loaded = load_model(out, warn=notes.append)
    assert notes == [f"no final/ or best/ model in {out} yet: using its newest complete checkpoint, {step4}"]
    # step-4 was saved with DDP's "module." names; its description comes from its training_state.json
    assert same_weights(loaded.model, random_model(3)) and loaded.weights == step4 / "model.safetensors"
    state = json.loads((step4 / "training_state.json").read_text())
    exact = [state["exact"][k] for k in ("class_names", "image_size", "mean", "std")]
    assert [loaded.class_names, list(loaded.image_size), loaded.mean, loaded.std] == exact
    assert (loaded.mean, loaded.std) != (0.5, 0.5) and loaded.train_config == state["config"]
    # A checkpoint whose files do not match its COMPLETE marker is refused, and OUTPUT_DIR skips it.
    weights = step4 / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ModelLoadError, match=r"step-00000004 is not a usable checkpoint: model.safetensors has \d+ b"):
        load_model(step4)
    assert same_weights(load_model(out).model, random_model(2))
    (step2 / "COMPLETE").unlink()
    with pytest.raises(ModelLoadError, match="not a usable checkpoint: no COMPLETE marker"):
        load_model(step2 / "model.safetensors")
    with pytest.raises(ModelLoadError, match="no usable checkpoint: step-00000004: .*; step-00000002: no COMPLETE"):
        load_model(out)


def test_load_model_errors_name_the_path_and_the_problem(saved_run, tmp_path):
    with pytest.raises(ModelLoadError, match=f"{tmp_path / 'nowhere'} does not exist: expected .*OUTPUT_DIR/final"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(ModelLoadError, match=f"no model in {tmp_path}: .*final/ and best/"):
        load_model(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="notes.txt is not a .safetensors file"):
        load_model(tmp_path / "notes.txt")
    lonely = tmp_path / "lonely"  # weights with nothing that describes them
    lonely.mkdir()
    shutil.copy(saved_run / "final" / "model.safetensors", lonely)
    with pytest.raises(ModelLoadError, match=f"{lonely} is not a usable checkpoint: no COMPLETE marker"):
        load_model(lonely)
    cut = shutil.copytree(saved_run / "final", tmp_path / "cut")
    (cut / "model.safetensors").write_bytes((cut / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=rf"{cut / 'model.safetensors'} cannot be read \(truncated or corrupt"):
        load_model(cut)
    wrong = shutil.copytree(saved_run / "final", tmp_path / "wrong")
    spec = json.loads((wrong / "model.json").read_text())
    (wrong / "model.json").write_text(json.dumps({**spec, "num_classes": 7}))
    with pytest.raises(ModelLoadError, match="do not fit the network described beside them"):
        load_model(wrong)


@pytest.mark.slow
def test_every_form_of_a_trained_run_loads_the_same_network(trained_run):
    final = load_model(trained_run / "final")
    steps = step_folders(trained_run)
    assert [s for s, _ in steps] == [2, 4]
    for path in (trained_run, trained_run / "final" / "model.safetensors", steps[-1][1]):
        loaded = load_model(path)
        assert same_weights(loaded.model, final.model)  # the last checkpoint holds the final weights
        assert (loaded.class_names, loaded.image_size, loaded.mean, loaded.std) == (class_names(4), (32, 32), 0.5, 0.5)
        assert loaded.train_config["width"] == 0.125
    assert not same_weights(load_model(steps[0][1]).model, final.model)
