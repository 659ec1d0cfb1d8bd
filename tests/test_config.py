import argparse

import pytest
import yaml

from distvgg.config import ConfigError, parse_config, positive_int, save_config
from tests.helpers import TINY, run_train


def test_defaults_follow_the_guide():
    cfg = parse_config([])
    assert (cfg.model, cfg.batch_size, cfg.lr, cfg.momentum, cfg.log_every) == ("vgg3layer", 64, 0.01, 0.9, 100)
    assert (cfg.report_to, cfg.mixed_precision, cfg.mean, cfg.std) == ("wandb", None, 0.5, 0.5)


def test_help_lists_options_with_defaults():
    out = run_train(["--help", "--report-to", "none"])  # in this process, as `python -m distvgg.train --help`
    assert out.returncode == 0, out.stderr
    flags = "--dataset --model --epochs --max-steps --batch-size --lr --seed --output-dir --train-limit --eval-limit"
    for flag in [*flags.split(), "--report-to", "--mixed-precision", "--log-every"]:
        assert flag in out.stdout
    assert "(default: 64)" in out.stdout and "(default: 'wandb')" in out.stdout


def test_yaml_then_command_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.1\nbatch-size: 32\naugment: false\nwandb_tags: [a, b]\n")
    cfg = parse_config(["--config", str(f), "--batch-size", "16"])
    assert (cfg.lr, cfg.batch_size, cfg.augment, cfg.wandb_tags) == (0.1, 16, False, ["a", "b"])


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
    out = run_train(["--lr", "-1", "--epochs", "0", "--report-to", "none"])
    assert out.returncode == 2
    assert "--lr" in out.stderr and "--epochs" in out.stderr


def test_type_errors_and_bad_choices_are_all_reported_with_where_they_come_from(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("width: wide\ntta: 3\nimage_size: [32, big]\n")
    args = (
        "--epochs abc --lr xyz --augment=maybe --batch-size 0 --model resnet --report-to mlflow --mixed-precision fp8"
    )
    with pytest.raises(ConfigError) as e:
        parse_config(["--config", str(f), *args.split()])
    msg = str(e.value)
    for part in (
        "--epochs must be a whole number, got 'abc'",
        "--lr must be a number, got 'xyz'",
        "--augment must be true or false, got 'maybe'",
        f"--config {f}: --width must be a number, got 'wide'",
        f"--config {f}: --tta must be true or false, got '3'",
        f"--config {f}: --image-size must be a whole number, got 'big'",
        "--batch-size must be at least 1, got 0",
        *("--model", "--report-to", "--mixed-precision"),
    ):
        assert part in msg


def test_booleans_as_flags_as_wandb_agent_gives_them_and_from_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("nesterov: true\naugment: false\nimage_size: null\n")
    cfg = parse_config(["--config", str(f), "--tta=True", "--channels-last=false", "--compile", "--no-deterministic"])
    flags = ("nesterov", "augment", "tta", "channels_last", "compile", "deterministic")
    assert [getattr(cfg, k) for k in flags] == [True, False, True, False, True, False]
    assert parse_config(["--config", str(f), "--augment"]).augment is True  # the command line wins
    assert parse_config(["--recipe", "fast", "--no-nesterov"]).nesterov is False  # over a recipe too


POSITIVE_INTS = [("3", None), (7, None), ("0", "at least 1"), ("-2", "at least 1"), ("1.5", "whole"), ("x", "whole")]


@pytest.mark.parametrize("text, error", [*POSITIVE_INTS, (True, "whole")])
def test_one_positive_integer_check(text, error):
    if error is None:
        assert positive_int(text) == int(text)
    else:
        with pytest.raises(argparse.ArgumentTypeError, match=error):
            positive_int(text)


def test_a_launch_that_cannot_run_the_options_exits_2_before_any_data(tmp_path):
    """No dataset exists at the path: the refusal comes before anything would read it, and nothing is written."""
    out = tmp_path / "run"
    args = ["--dataset", str(tmp_path / "nothing"), "--output-dir", str(out), "--report-to", "none"]
    proc = run_train([*args, "--train-limit", "16", "--batch-size", "32"])
    assert proc.returncode == 2, proc.stderr
    assert "--train-limit 16 is less than one global batch of 32" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_fewer_training_images_than_one_global_batch_is_one_line(tiny_dataset, tmp_path):
    args = ["--dataset", str(tiny_dataset), "--output-dir", str(tmp_path / "run"), *TINY, "--batch-size", "64"]
    proc = run_train(args)
    assert proc.returncode == 1, proc.stderr
    assert "the training set has 40 images, fewer than one global batch of 64" in proc.stderr
    assert "Traceback" not in proc.stderr
