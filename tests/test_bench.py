"""distvgg.bench in its tiny CI mode: complete, well-formed output through train.py's own step; no timing asserts.
Also the pieces the benchmark's fast recipe relies on: --recipe, flip TTA in evaluate, optimizer kernels, TF32."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from distvgg import bench, train
from distvgg.config import ConfigError, TrainConfig, parse_config
from tests.datagen import make_parquet_dataset
from tests.helpers import REPO, ok

LOOPS = ("seed_loop", "distvgg_same", "distvgg_best")

# Runs the bench's CLI entry point with train.train_step wrapped, to count the steps that went through it.
COUNTING_RUN = textwrap.dedent("""
    import collections, json, sys
    from distvgg import bench, train
    seen = collections.Counter()
    real_step = train.train_step
    def counting_step(*args, **kwargs):
        seen[int(args[5][0][0].shape[0])] += 1  # micro_batches[0] = (images, labels)
        return real_step(*args, **kwargs)
    train.train_step = counting_step
    code = bench.main(sys.argv[1:])
    print("TRAIN_STEPS " + json.dumps(seen))
    sys.exit(code)
""")


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    return make_parquet_dataset(tmp_path_factory.mktemp("bench") / "tiny", n_train=160, n_test=40, num_classes=4)


@pytest.fixture(scope="module")
def tiny_bench(tiny_dataset, tmp_path_factory):
    """One tiny benchmark with --time-to-accuracy: (JSON result, stdout, train_step calls by batch size)."""
    out = tmp_path_factory.mktemp("bench-out") / "bench.json"
    args = [
        "--tiny",
        "--device",
        "cpu",
        "--dataset",
        str(tiny_dataset),
        "--json",
        str(out),
        "--steps",
        "2",
        "--repeats",
        "2",
        "--warmup-steps",
        "1",
        "--time-to-accuracy",
        "0",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", COUNTING_RUN, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    text = ok(proc)
    steps_line = [line for line in proc.stdout.splitlines() if line.startswith("TRAIN_STEPS ")][-1]
    return json.loads(out.read_text()), text, {int(k): v for k, v in json.loads(steps_line[12:]).items()}


def test_json_is_complete_and_well_formed(tiny_bench):
    result, _, _ = tiny_bench
    for name in LOOPS:
        loop = result[name]
        assert positive(loop["images_per_second"]), (name, loop)
        assert isinstance(loop["batch_size"], int) and loop["batch_size"] >= 1
        assert loop["precision"] in ("fp32", "tf32", "bf16", "fp16")
        assert len(loop["windows_images_per_second"]) >= 2 and all(map(positive, loop["windows_images_per_second"]))
        assert loop["first_step_seconds"] >= 0 and loop["setup_seconds"] >= 0
    assert positive(result["ratio_same_vs_seed"]) and positive(result["ratio_best_vs_seed"])
    # the two loops the issue fixes: the guide's settings for the seed loop and for distvgg_same
    for name in ("seed_loop", "distvgg_same"):
        assert (result[name]["batch_size"], result[name]["precision"]) == (64, "fp32")
    assert isinstance(result["device"]["name"], str) and result["device"]["name"]
    assert result["device"]["type"] == "cpu"
    for pkg in ("python", "torch", "torchvision", "accelerate", "distvgg"):
        assert result["versions"][pkg] and result["versions"][pkg] != "not installed"
    costs = result["one_time_costs"]
    assert costs["data_first_load"] in ("decoded", "cache")
    assert costs["data_first_load_seconds"] >= 0 and costs["data_cached_load_seconds"] >= 0
    assert (costs["train_images"], costs["test_images"]) == (160, 40)


def test_time_to_accuracy_fields(tiny_bench):
    t = tiny_bench[0]["time_to_accuracy"]
    assert t["recipe"] == "fast" and t["target"] == 0.0
    assert t["reached"] is True and t["epochs_to_target"] == 1  # any accuracy is >= 0 after the first epoch
    assert positive(t["train_seconds_to_target"]) and positive(t["train_seconds_total"])
    assert t["train_seconds_to_target"] <= t["train_seconds_total"]
    assert t["epochs"] == len(t["history"]) >= 1 and t["test_images"] == 40
    assert 0 <= t["best_accuracy"] <= 1 and 0 <= t["final_accuracy"] <= 1
    assert positive(t["images_per_second"]) and t["eval_seconds_total"] > 0
    assert t["one_time_costs"]["warmup_seconds"] > 0 and t["one_time_costs"]["setup_seconds"] > 0
    assert t["config"]["recipe"] == "fast" and t["config"]["tta"] is True  # the recipe was applied


def test_distvgg_loops_go_through_train_step(tiny_bench):
    """distvgg_same (batch 64) and distvgg_best run train.train_step for every warm-up and timed step;
    the time-to-accuracy run (tiny: batch 32) trains through it too."""
    result, text, steps = tiny_bench
    per_loop = 1 + 2 * 2  # --warmup-steps 1, --steps 2 x --repeats 2
    best = result["distvgg_best"]["batch_size"]
    assert best != 64
    assert steps.get(64, 0) == per_loop
    assert steps.get(best, 0) == per_loop
    assert steps.get(32, 0) > 0
    assert "seed_loop" in text and "distvgg_best" in text  # the printed table


def test_bad_options_exit_2_with_a_message(tiny_dataset, capsys):
    assert bench.main(["--dataset", str(tiny_dataset), "--steps", "0", "--time-to-accuracy", "150"]) == 2
    err = capsys.readouterr().err
    assert "--steps must be at least 1" in err and "--time-to-accuracy" in err
    if not torch.cuda.is_available():
        assert bench.main(["--dataset", str(tiny_dataset), "--device", "cuda"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err


# ---- the fast recipe and the switches it uses -------------------------------------------------------------


def test_recipe_applies_first_then_config_then_command_line(tmp_path):
    cfg = parse_config(["--recipe", "fast"])
    assert (cfg.recipe, cfg.batch_size, cfg.schedule, cfg.nesterov, cfg.tta) == ("fast", 512, "onecycle", True, True)
    assert cfg.label_smoothing > 0 and cfg.model == "vgg3layer" and cfg.width == 1.0
    config = tmp_path / "c.yaml"
    config.write_text("recipe: fast\nbatch_size: 256\nepochs: 3\n")
    cfg = parse_config(["--config", str(config), "--epochs", "5"])
    assert (cfg.recipe, cfg.batch_size, cfg.epochs, cfg.tta) == ("fast", 256, 5, True)
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


class _OneProcess:
    """The part of an Accelerator that evaluate uses, for one process."""

    @staticmethod
    def gather_for_metrics(x):
        return x


def test_flip_tta_averages_the_logits_of_each_image_and_its_mirror():
    from distvgg import batches

    torch.manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 4, 4), dtype=torch.uint8)
    labels = torch.randint(0, 3, (12,))
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))  # not mirror-symmetric
    prepare = train.make_prepare_batch(TrainConfig(augment=False))
    loader = batches.eval_loader(images, labels, 5)
    x = batches.normalize(images, 0.5, 0.5)
    with torch.no_grad():
        plain, mirrored = model(x), model(x.flip(-1))
    for tta, logits in ((False, plain), (True, (plain + mirrored) / 2)):
        result = train.evaluate(model, loader, _OneProcess(), prepare, 3, tta=tta)
        expected = torch.bincount(labels * 3 + logits.argmax(1), minlength=9).view(3, 3)
        assert result["confusion"] == expected.tolist()
        assert result["loss"] == pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)


@pytest.mark.parametrize(
    "impl, flags",
    [
        ("auto", {"fused": True}),
        ("fused", {"fused": True}),
        ("foreach", {"foreach": True}),
        ("loop", {"foreach": False}),
    ],
)
def test_optimizer_impl_selects_torch_kernels(impl, flags):
    model = nn.Linear(4, 2)
    for name in ("sgd", "adamw"):
        opt = train.make_optimizer(TrainConfig(optimizer=name, optimizer_impl=impl), model)
        assert {k: opt.defaults[k] for k in flags} == flags
        model(torch.randn(3, 4)).sum().backward()
        before = model.weight.detach().clone()
        opt.step()  # the kernel runs on this device
        assert not torch.equal(before, model.weight)


def test_optimizer_impl_is_validated():
    with pytest.raises(ConfigError, match="--optimizer-impl must be one of auto, fused, foreach, loop"):
        parse_config(["--optimizer-impl", "fast"])


def test_set_tf32_switches_cuda_matmul_and_conv():
    saved = bench.backend_flags()
    try:
        train.set_tf32(True)
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == ("tf32",) * 2
        train.set_tf32(False)
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == ("ieee",) * 2
    finally:
        bench.restore_backend_flags(saved)
    assert bench.backend_flags() == saved


def test_each_loop_gets_its_own_cuda_switches():
    """seed_loop keeps torch's defaults, distvgg_same adds only cuDNN autotuning, distvgg_best TF32 too;
    the switches are process-wide, so they are set again before each timed window."""
    saved = bench.backend_flags()
    try:
        defaults = {**saved, "matmul": "none", "conv": "tf32", "cudnn.benchmark": False}
        same = bench.cuda_flags(defaults, None, True)
        best = bench.cuda_flags(defaults, True, True)
        assert same == {**defaults, "cudnn.benchmark": True}
        assert (best["matmul"], best["conv"], best["cudnn.benchmark"]) == ("tf32", "tf32", True)
        assert bench.cuda_flags(defaults, False, True)["matmul"] == "ieee"
        bench.restore_backend_flags(best)
        assert bench.backend_flags() == best
        bench.restore_backend_flags(defaults)
        assert bench.backend_flags() == defaults
    finally:
        bench.restore_backend_flags(saved)


@pytest.mark.slow
def test_gpu_check_script_plumbing_on_the_cpu(tiny_dataset, tmp_path):
    """launch/gpu_check.sh is for a GPU session; CI checks that its steps and its summary work, on the CPU."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DEVICE": "cpu",
        "ACCEL_CONFIG": "accelerate_configs/cpu.yaml",
        "MIXED_PRECISIONS": "no bf16",
        "SKIP_COMPILE": "1",
        "BENCH_ARGS": "--tiny --repeats 1",
        "TARGET": "0",
        "EPOCHS": "1",
        "DATASET": str(tiny_dataset),
        "PYTHON": sys.executable,
        "RUNS_DIR": str(tmp_path / "runs"),
        "TRAIN_ARGS": "--width 0.125 --batch-size 16 --eval-batch-size 20 --log-every 2",
    }
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(REPO / "launch" / "gpu_check.sh"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=env,
    )
    ok(proc)
    assert sorted(p.name for p in out.iterdir()) == [
        "bench_cuda.json",
        "gpu_check.log",
        "nvidia-smi.txt",
        "summary.json",
        "time_to_accuracy.json",
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert [s["exit_code"] for s in summary["steps"]] == ["0"] * 4  # bench, time to accuracy, 2 trainings
    assert summary["time_to_accuracy"]["time_to_accuracy"]["reached"] is True
    for mp in ("no", "bf16"):
        run = summary[f"train_{mp}"]
        assert run["final_model"] is True and run["epochs_evaluated"] == 1 and run["checkpoints"]
        assert 0 <= run["eval_accuracy"] <= 1
