import subprocess
import sys

import pytest
import yaml

from distvgg.config import ConfigError, TrainConfig, build_parser, field_docs, parse_config, save_config


def test_defaults_follow_the_guide():
    cfg = parse_config([])
    assert (cfg.model, cfg.batch_size, cfg.lr, cfg.momentum, cfg.log_every) == ("vgg3layer", 64, 0.01, 0.9, 100)
    assert (cfg.report_to, cfg.mixed_precision, cfg.mean, cfg.std) == ("wandb", None, 0.5, 0.5)


def test_every_field_has_a_docstring_and_a_flag():
    docs = field_docs()
    help_text = build_parser().format_help()
    for name in TrainConfig.__dataclass_fields__:
        assert docs.get(name), f"{name} has no docstring"
        assert f"--{name.replace('_', '-')}" in help_text


def test_help_lists_options_with_defaults():
    out = subprocess.run([sys.executable, "-m", "distvgg.train", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in (
        "--dataset",
        "--model",
        "--epochs",
        "--max-steps",
        "--batch-size",
        "--lr",
        "--seed",
        "--output-dir",
        "--train-limit",
        "--eval-limit",
        "--report-to",
        "--mixed-precision",
        "--log-every",
    ):
        assert flag in out.stdout
    assert "(default: 64)" in out.stdout and "(default: 'wandb')" in out.stdout


def test_yaml_then_command_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.1\nbatch-size: 32\naugment: false\nwandb_tags: [a, b]\n")
    cfg = parse_config(["--config", str(f), "--batch-size", "16"])
    assert (cfg.lr, cfg.batch_size, cfg.augment, cfg.wandb_tags) == (0.1, 16, False, ["a", "b"])


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as e:
        parse_config(
            [
                "--lr",
                "-1",
                "--batch-size",
                "0",
                "--model",
                "resnet",
                "--report-to",
                "mlflow",
                "--mixed-precision",
                "fp8",
            ]
        )
    msg = str(e.value)
    for part in ("--lr", "--batch-size", "--model", "--report-to", "--mixed-precision"):
        assert part in msg


def test_yaml_unknown_keys_and_bad_types(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.1\nlearning_rate: 3\nbatchsize: 2\n")
    with pytest.raises(ConfigError, match="batchsize, learning_rate"):
        parse_config(["--config", str(f)])
    f.write_text("lr: fast\nepochs: 1.5\naugment: 3\n")
    with pytest.raises(ConfigError) as e:
        parse_config(["--config", str(f)])
    assert "lr" in str(e.value) and "epochs" in str(e.value) and "augment" in str(e.value)
    with pytest.raises(ConfigError, match="no such file"):
        parse_config(["--config", str(tmp_path / "missing.yaml")])


def test_saved_config_loads_back(tmp_path):
    cfg = parse_config(["--lr", "0.05", "--wandb-tags", "x"])
    save_config(cfg, tmp_path / "config.yaml", extra={"num_processes": 2})
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["lr"] == 0.05
    assert parse_config(["--config", str(tmp_path / "config.yaml")]) == cfg


def test_train_exits_2_on_bad_config_before_heavy_work():
    out = subprocess.run(
        [sys.executable, "-m", "distvgg.train", "--lr", "-1", "--epochs", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "--lr" in out.stderr and "--epochs" in out.stderr
