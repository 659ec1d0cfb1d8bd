"""The scaling model: its arithmetic on known numbers, and the command's output (never its timings)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from distvgg import scaling
from distvgg.models import build_model, count_parameters
from tests.helpers import REPO


def test_vgg3layer_gradient_bytes():
    params = count_parameters(build_model("vgg3layer", 10))
    assert params == 33_975_306  # "34M parameters"
    # about 136 MB in fp32, 68 MB with the bf16 hook
    assert {f: params * w for f, w in scaling.GRADIENT_FORMATS.items()} == {"fp32": 135_901_224, "bf16": 67_950_612}


@pytest.mark.parametrize("n, expected", [(1, 0.0), (2, 100.0), (4, 150.0), (8, 175.0), (64, 196.875)])
def test_ring_allreduce_moves_2_n_minus_1_over_n_of_the_bytes(n, expected):
    assert scaling.ring_allreduce_bytes(n, 100.0) == pytest.approx(expected)


def row_of(rows, interconnect, gradients, gpus):
    return next(r for r in rows if (r["interconnect"], r["gradients"], r["gpus"]) == (interconnect, gradients, gpus))


def test_overlap_and_minimum_batch():
    # 1 ms per image, 10 ms of all-reduce: B ms / (B + 10) ms >= 0.9  <=>  B >= 90.
    assert scaling.min_batch_per_gpu(1e-3, 10e-3) == 90
    assert scaling.min_batch_per_gpu(1e-3, 10e-3, overlap=0.5) == 45
    # 3,125,000 fp32 gradients (12.5 MB) over Ethernet 10G (1.25 GB/s) at 2 GPUs: 10 ms of all-reduce
    for batch, ok in ((90, True), (89, False)):
        row = row_of(scaling.predict(3_125_000, 1e-3, batch), "Ethernet 10G", "fp32", 2)
        assert row["comm_seconds"] == pytest.approx(10e-3) and row["min_batch_per_gpu"] == 90
        assert row["step_seconds"] == pytest.approx(batch * 1e-3 + 10e-3)
        assert (row["efficiency"] >= 0.9 - 1e-12) is ok
    row = row_of(scaling.predict(3_125_000, 1e-3, 90, overlap=0.5), "Ethernet 10G", "fp32", 2)
    assert row["step_seconds"] == pytest.approx(0.095) and row["min_batch_per_gpu"] == 45


def test_predict_rows_by_hand():
    rows = scaling.predict(num_params=1_000_000, seconds_per_image=1e-3, batch_per_gpu=10)
    assert len(rows) == len(scaling.INTERCONNECTS) * 2 * len(scaling.GPU_COUNTS)
    row = row_of(rows, "Ethernet 10G", "fp32", 8)
    comm = 2 * 7 / 8 * 4_000_000 / 1.25e9  # 5.6 ms
    assert row["allreduce_bytes_per_gpu"] == pytest.approx(7_000_000)
    assert row["comm_seconds"] == pytest.approx(comm)
    assert row["step_seconds"] == pytest.approx(0.010 + comm)
    assert row["efficiency"] == pytest.approx(0.010 / (0.010 + comm))
    assert row["images_per_second"] == pytest.approx(80 / (0.010 + comm))
    bf16 = row_of(rows, "Ethernet 10G", "bf16", 8)
    assert bf16["comm_seconds"] == pytest.approx(comm / 2)
    # More GPUs or a slower link never help.
    for link in scaling.INTERCONNECTS:
        effs = [r["efficiency"] for r in rows if r["interconnect"] == link and r["gradients"] == "fp32"]
        assert effs == sorted(effs, reverse=True)


def test_recommendation_picks_the_hook_and_batch():
    rows = scaling.predict(num_params=1_000_000, seconds_per_image=1e-3, batch_per_gpu=10)
    recs = {(r["interconnect"], r["gpus"]): r for r in scaling.recommend(rows, batch_per_gpu=10)}
    eth = recs[("Ethernet 10G", 8)]
    # fp32: B >= 9 x 5.6 ms / 1 ms = 50.4 -> 51; bf16: 25.2 -> 26; 10 is below both.
    assert (eth["min_batch_fp32"], eth["min_batch_bf16"], eth["hook"], eth["batch_per_gpu"]) == (51, 26, "bf16", 26)
    nv = recs[("NVLink", 64)]
    assert nv["hook"] == "none" and nv["batch_per_gpu"] == 10  # 10 images already hide 0.026 ms
    recs = {(r["interconnect"], r["gpus"]): r for r in scaling.recommend(rows, batch_per_gpu=30)}
    assert recs[("Ethernet 10G", 8)]["hook"] == "bf16" and recs[("Ethernet 10G", 8)]["batch_per_gpu"] == 30
    # A global batch cap: 26 x 8 = 208 > 200 -> not reachable at 8 GPUs; 2 GPUs (bf16: 9 x 1.6 ms = 14.4 -> 15) is.
    recs = scaling.recommend(rows, batch_per_gpu=10, max_global_batch=200)
    eth = [r for r in recs if r["interconnect"] == "Ethernet 10G"]
    expected = [(2, "bf16", 15), (8, None, None), (16, None, None), (64, None, None)]
    assert [(r["gpus"], r["hook"], r["batch_per_gpu"]) for r in eth] == expected
    assert scaling.advice(eth, 200) == (
        "--ddp-comm-hook bf16, batch 15 per GPU: >= 90% up to 2 GPUs (more would need a global batch over 200)"
    )
    assert "below 90% even at 2 GPUs" in scaling.advice(scaling.recommend(rows, 10, max_global_batch=20)[-4:], 20)


def run_scaling(*args: str, capsys: pytest.CaptureFixture) -> str:
    """``python -m distvgg.scaling ARGS`` in this process; its output."""
    assert scaling.main(list(args)) == 0
    return capsys.readouterr().out


def test_command_output_is_complete(tmp_path, capsys):
    out = tmp_path / "scaling.json"
    text = run_scaling("--width", "0.125", "--batch-per-gpu", "8", "--steps", "1", "--json", str(out), capsys=capsys)
    assert "2(n-1)/n" in text and "vgg3layer:" in text and "ms/image" in text
    for link in scaling.INTERCONNECTS:
        assert text.count(f"| {link} |") == 3  # fp32 row, bf16 row, recommendation row
    assert "| 2 GPUs | 8 GPUs | 16 GPUs | 64 GPUs |" in text
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["device_name"].startswith(scaling.machine.cpu_name())
    (model,) = report["models"]
    params = count_parameters(build_model("vgg3layer", 10, width=0.125))
    assert model["parameters"] == params and model["gradient_bytes"] == {"fp32": 4 * params, "bf16": 2 * params}
    assert math.isfinite(model["compute_seconds_per_image"]) and model["compute_seconds_per_image"] > 0
    assert len(model["predictions"]) == len(scaling.INTERCONNECTS) * 2 * 4
    for row in model["predictions"]:
        assert row["step_seconds"] >= row["compute_seconds"] and 0 < row["efficiency"] <= 1
        n, gradient_bytes = row["gpus"], model["gradient_bytes"][row["gradients"]]
        assert row["comm_seconds"] == pytest.approx(2 * (n - 1) / n * gradient_bytes / row["bus_bandwidth"])
    every = {(i, n) for i in scaling.INTERCONNECTS for n in scaling.GPU_COUNTS}
    assert {(r["interconnect"], r["gpus"]) for r in model["recommendations"]} == every
    assert "check" not in report


def test_given_throughput_is_used_as_is(tmp_path, capsys):
    out = tmp_path / "s.json"
    run_scaling("--images-per-second", "100000", "--batch-per-gpu", "512", "--json", str(out), capsys=capsys)
    model = json.loads(out.read_text())["models"][0]
    assert model["compute_seconds_per_image"] == pytest.approx(1e-5) and "given" in model["compute_source"]
    row = row_of(model["predictions"], "InfiniBand 200G", "fp32", 64)
    comm = 2 * 63 / 64 * 135_901_224 / 25e9
    assert row["efficiency"] == pytest.approx(5.12e-3 / (5.12e-3 + comm))


def test_a_failing_worker_still_destroys_its_process_group(monkeypatch):
    """Each process of the 2-process check destroys its gloo group whatever happens (one left alive can abort it)."""
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS"):
        monkeypatch.setenv(key, os.environ.get(key, ""))  # restored after the test

    def failing_rounds(rank, work, steps, folder):
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        raise RuntimeError("failed mid-way")

    monkeypatch.setattr(scaling, "_two_process_rounds", failing_rounds)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(RuntimeError, match="failed mid-way"):
            scaling._two_process_worker(0, "unused", scaling.Workload("vgg3layer", 2), 1, threads)
    finally:
        torch.set_num_threads(threads)
    assert not dist.is_initialized()


@pytest.mark.slow
def test_two_process_check_output_is_complete(tmp_path):
    """``python -m distvgg.scaling --measure-allreduce``: 2 gloo processes, which both exit cleanly."""
    out, env = tmp_path / "s.json", {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    args = "--width 0.125 --batch-per-gpu 8 --check-batch 8 --steps 1 --measure-allreduce --json".split()
    command = [sys.executable, "-m", "distvgg.scaling", *args, str(out)]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0 and "terminate called" not in proc.stderr, proc.stderr
    check = json.loads(out.read_text())["check"]
    params = count_parameters(build_model("vgg3layer", 10, width=0.125))
    assert check["numel"] == params and check["gradient_bytes"] == 4 * params
    keys = "allreduce ddp_step no_sync_step compute_alone predicted_step measured_step"
    for key in [*(k + "_seconds" for k in keys.split()), "bus_bandwidth"]:
        assert math.isfinite(check[key]) and check[key] > 0, key
    # the prediction is the formula applied to the measured inputs
    assert check["bus_bandwidth"] == pytest.approx(check["gradient_bytes"] / check["allreduce_seconds"])
    assert check["predicted_step_seconds"] == pytest.approx(check["compute_alone_seconds"] + check["allreduce_seconds"])
    ratio = check["predicted_step_seconds"] / check["measured_step_seconds"]
    assert check["relative_error"] == pytest.approx(ratio - 1)
    assert "prediction / measured - 1" in proc.stdout and "bus bandwidth" in proc.stdout


BAD_ARGS = {"--overlap 1.5": "--overlap must be in [0, 1)", "--batch-per-gpu 0": "--batch-per-gpu must be at least 1"}
BAD_ARGS["--model vgg99"] = "invalid choice"


@pytest.mark.parametrize("args", BAD_ARGS)
def test_bad_arguments_are_clear_errors(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        scaling.main(args.split())
    assert exit_info.value.code == 2 and BAD_ARGS[args] in capsys.readouterr().err
