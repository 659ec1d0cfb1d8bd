"""distvgg.bench in process and its tiny CI mode end to end (no timing asserts); distvgg.machine; --recipe."""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from distvgg import bench, machine
from distvgg.config import ConfigError, TrainConfig, parse_config
from tests.datagen import make_parquet_dataset
from tests.helpers import REPO, ok

LOOPS = ("seed_loop", "distvgg_same", "distvgg_best")

# Loaded at the start of every Python process of the bench (its own, the loops' and the training run's): wraps
# train.train_step to append the batch size of each step it runs to $COUNT_STEPS.
COUNTING_SITECUSTOMIZE = textwrap.dedent("""
    import os
    from distvgg import train
    real_step = train.train_step
    def counting_step(*args, **kwargs):
        with open(os.environ["COUNT_STEPS"], "a") as f:
            f.write(f"{int(args[5][0][0].shape[0])}\\n")  # micro_batches[0] = (images, labels)
        return real_step(*args, **kwargs)
    train.train_step = counting_step
""")

X86_FLAGS = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx2 avx512f {}\n\nprocessor\t: 1\n"
ARM_FEATURES = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd {}\nCPU part\t: 0xd40\n"


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.mark.parametrize(
    "text, expected",
    [
        (X86_FLAGS.format("avx512_bf16"), True),
        (X86_FLAGS.format("amx_bf16 amx_tile"), True),
        (X86_FLAGS.format("avx512_vnni"), False),  # AVX-512 without its bf16 extension
        (X86_FLAGS.format("bf16"), False),  # arm's flag name means nothing on an x86 flags line
        (ARM_FEATURES.format("bf16 i8mm"), True),
        (ARM_FEATURES.format("sve2"), False),
        ("", False),  # no /proc/cpuinfo: unknown
    ],
)
def test_cpu_has_bf16_reads_the_flags_of_cpuinfo(text, expected):
    assert machine.cpu_has_bf16(text) is expected


def test_machine_facts_of_this_machine():
    assert machine.cpu_name(X86_FLAGS.format("")) == "Some CPU"
    assert machine.device_name("cpu") == machine.cpu_name() and machine.cpu_name()
    # This machine's answer, against its own /proc/cpuinfo read here by other means (no file: no bf16 known).
    info = open(machine.CPUINFO).read() if os.path.isfile(machine.CPUINFO) else ""
    words = {w for line in info.splitlines() if line.startswith(("flags", "Features")) for w in line.split()}
    assert machine.cpu_has_bf16() is bool(words & {"avx512_bf16", "amx_bf16", "bf16"})
    load = machine.load_average()
    assert load is None or (len(load) == 3 and all(x >= 0 for x in load))
    versions = machine.package_versions(["torch", "surely-not-a-package-name"])
    assert versions["torch"].split("+")[0] == torch.__version__.split("+")[0] and versions["python"].count(".") == 2
    assert versions["surely-not-a-package-name"] == "not installed"


def cpu_args(*argv: str) -> argparse.Namespace:
    return bench.parse_args(["--device", "cpu", *argv])


@pytest.mark.parametrize("has_bf16, precision", [(True, "bf16"), (False, "fp32")])
def test_best_cpu_settings_use_bf16_only_where_the_cpu_has_it(monkeypatch, tmp_path, has_bf16, precision):
    """Emulated bf16 (an AVX2-only CPU) runs many times slower than fp32: the best settings are fp32 there."""
    monkeypatch.setattr(machine, "cpu_has_bf16", lambda cpuinfo=None: has_bf16)
    best = bench.best_loop(cpu_args())
    assert (best.precision, best.batch_size, best.channels_last) == (precision, 256, True)
    assert bench.best_loop(cpu_args("--tiny")).batch_size == 128  # half of the tiny mode's 256 images
    assert bench.loop_config(cpu_args(), best, tmp_path, None).mixed_precision == ("bf16" if has_bf16 else "no")


def test_defaults_follow_the_mode_and_training():
    args = cpu_args()
    assert (args.width, args.steps, args.warmup_steps, args.repeats, args.train_limit) == (1.0, 8, 2, 5, None)
    assert args.dataset == TrainConfig().dataset == "uoft-cs/cifar10"  # the same default as training
    tiny = cpu_args("--tiny", "--steps", "3")
    assert (tiny.width, tiny.steps, tiny.warmup_steps, tiny.repeats, tiny.train_limit) == (0.125, 3, 1, 2, 256)
    assert cpu_args("--time-to-accuracy", "88").time_to_accuracy == pytest.approx(0.88)


def test_bad_options_exit_2_with_a_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--steps", "0", "--warmup-steps", "-1", "--time-to-accuracy", "150"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--steps must be at least 1" in err and "--warmup-steps must be >= 0" in err
    assert "--time-to-accuracy" in err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench.main(["--device", "cuda"])
        assert "no CUDA GPU" in capsys.readouterr().err


def test_each_loop_gets_its_own_cuda_switches():
    """seed_loop: torch's defaults, distvgg_same: cuDNN autotuning, distvgg_best: TF32 too; set again per window."""
    saved = bench.backend_flags()
    try:
        on, off = bench.backend_flags(True), bench.backend_flags(False)
        assert on == ("high", True, True) and off == ("highest", False, True)
        for flags in (on, off, saved):
            bench.set_backend_flags(flags)
            assert bench.backend_flags() == flags
    finally:
        bench.set_backend_flags(saved)


def test_recipe_applies_first_then_config_then_command_line(tmp_path):
    cfg = parse_config(["--recipe", "fast"])
    assert (cfg.recipe, cfg.batch_size, cfg.schedule, cfg.nesterov, cfg.tta) == ("fast", 256, "onecycle", True, True)
    assert cfg.tta_translate and cfg.lr_reference_batch == 256
    assert cfg.label_smoothing > 0 and cfg.model == "vgg3layer" and cfg.width == 1.0
    config = tmp_path / "c.yaml"
    config.write_text("recipe: fast\nbatch_size: 128\nepochs: 3\n")
    cfg = parse_config(["--config", str(config), "--epochs", "5"])
    assert (cfg.recipe, cfg.batch_size, cfg.epochs, cfg.tta) == ("fast", 128, 5, True)
    assert parse_config([]).recipe is None and parse_config([]).tta is False


def test_recipe_from_a_file_and_unknown_names(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("lr: 0.05\nlabel_smoothing: 0.1\n")
    assert parse_config(["--recipe", str(mine)]).lr == 0.05
    with pytest.raises(ConfigError, match="no recipe named 'nope'.*shipped recipes: fast"):
        parse_config(["--recipe", "nope"])
    mine.write_text("lr: 0.05\nbogus: 1\n")
    with pytest.raises(ConfigError, match=r"--recipe .*unknown option\(s\) bogus"):
        parse_config(["--recipe", str(mine)])


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    """One tiny benchmark with --time-to-accuracy: (JSON result, output, train_step calls by batch size)."""
    dataset = make_parquet_dataset(tmp_path_factory.mktemp("bench") / "tiny", n_train=160, n_test=40, num_classes=4)
    work = tmp_path_factory.mktemp("bench-out")
    out, counts, site = work / "bench.json", work / "steps.txt", work / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(COUNTING_SITECUSTOMIZE)
    args = ["--tiny", "--device", "cpu", "--dataset", str(dataset), "--json", str(out), "--time-to-accuracy", "0"]
    path = os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "COUNT_STEPS": str(counts)}
    command = [sys.executable, "-m", "distvgg.bench", *args]
    text = ok(subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, env=env))
    return json.loads(out.read_text()), text, collections.Counter(map(int, counts.read_text().split()))


@pytest.mark.slow
def test_json_is_complete_and_well_formed(tiny_bench):
    result, _, _ = tiny_bench
    for name in LOOPS:
        loop = result[name]
        assert positive(loop["images_per_second"]), (name, loop)
        assert isinstance(loop["batch_size"], int) and loop["batch_size"] >= 1
        assert loop["precision"] in ("fp32", "tf32", "bf16", "fp16")
        assert len(loop["windows_images_per_second"]) == 2 and all(map(positive, loop["windows_images_per_second"]))
        assert loop["first_step_seconds"] >= 0 and loop["setup_seconds"] >= 0
    assert positive(result["ratio_same_vs_seed"]) and positive(result["ratio_best_vs_seed"])
    for name in ("seed_loop", "distvgg_same"):  # the guide's settings
        assert (result[name]["batch_size"], result[name]["precision"]) == (64, "fp32")
    expected_best = "bf16" if machine.cpu_has_bf16() else "fp32"
    assert result["distvgg_best"]["precision"] == expected_best
    # Each distvgg loop ran in a process of its own, with its own Accelerate mixed precision.
    assert result["distvgg_same"]["mixed_precision"] == "no"
    assert result["distvgg_best"]["mixed_precision"] == ("bf16" if expected_best == "bf16" else "no")
    device = result["device"]
    assert device["type"] == "cpu" and device["name"] == machine.cpu_name() and device["cpu_bf16"] is not None
    for pkg in ("python", "torch", "torchvision", "accelerate", "distvgg"):
        assert result["versions"][pkg] and result["versions"][pkg] != "not installed"
    costs = result["one_time_costs"]
    assert costs["data_first_load"] in ("decoded", "cache")
    assert costs["data_first_load_seconds"] >= 0 and costs["data_cached_load_seconds"] >= 0
    assert (costs["train_images"], costs["test_images"]) == (160, 40)


@pytest.mark.slow
def test_time_to_accuracy_fields(tiny_bench):
    t = tiny_bench[0]["time_to_accuracy"]
    assert t["recipe"] == "fast" and t["target"] == 0.0
    assert t["reached"] is True and t["epochs_to_target"] == 1  # any accuracy is >= 0 after the first epoch
    assert positive(t["train_seconds_to_target"]) and positive(t["train_seconds_total"])
    assert t["train_seconds_to_target"] <= t["train_seconds_total"]
    assert t["epochs"] == len(t["history"]) == 2 and t["test_images"] == 40
    assert 0 <= t["best_accuracy"] <= 1 and 0 <= t["final_accuracy"] <= 1
    assert positive(t["images_per_second"]) and t["eval_seconds_total"] > 0
    assert [h["epoch"] for h in t["history"]] == [1, 2]
    assert 0 < t["history"][0]["train_seconds"] < t["history"][1]["train_seconds"] == t["train_seconds_total"]
    split = t["time_split"]  # the run's own split, read from its metrics.jsonl
    assert split["train_seconds"] == t["train_seconds_total"] and split["wall_seconds"] >= split["train_seconds"]
    costs = t["one_time_costs"]
    assert costs["setup_seconds"] > 0 and costs["compile_seconds"] == 0 and costs["compile"] is False
    assert costs["main_seconds"] > split["wall_seconds"]
    assert t["config"]["recipe"] == "fast" and t["config"]["tta"] is True  # the recipe was applied


@pytest.mark.slow
def test_distvgg_loops_go_through_train_step_and_show_progress(tiny_bench):
    """Both distvgg loops and the time to accuracy run train through train.train_step; each window prints a line."""
    result, text, steps = tiny_bench
    per_loop = 1 + 2 * 2  # --warmup-steps 1, --steps 2 x --repeats 2
    best = result["distvgg_best"]["batch_size"]
    assert best != 64
    assert steps.get(64, 0) == per_loop and steps.get(best, 0) == per_loop
    assert steps.get(32, 0) == 2 * (160 // 32)  # 2 epochs of 5 steps, no more
    for r in (1, 2):
        for name in LOOPS:
            assert f"round {r}/2 {name}" in text
    assert "epoch 2: test accuracy" in text and "time to 0.0%" in text
