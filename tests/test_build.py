"""distvgg/build.py's GPU-path logic, on a CPU: TF32, the fused SGD's momentum, RNG states, data placement."""

from __future__ import annotations

import os
import random
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from distvgg import build, internals
from distvgg.checkpoint import restore_rng
from distvgg.config import TrainConfig


@pytest.mark.parametrize("enabled", [True, False])
def test_tf32_switches_read_back_through_both_apis(enabled):
    """Inductor and Accelerate read the legacy switches; torch >= 2.9 raises on a read after a mix of APIs."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        build.set_tf32(enabled)
        assert torch.backends.cuda.matmul.allow_tf32 is enabled
        assert torch.get_float32_matmul_precision() == ("high" if enabled else "highest")
        assert torch.backends.cudnn.allow_tf32 is enabled
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # the new API agrees
            assert torch.backends.cuda.matmul.fp32_precision == ("tf32" if enabled else "ieee")
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def test_loss_scale_reads_the_scalers_device_tensor():
    """A torch internal (GradScaler's scale tensor, distvgg.internals): fails loudly if torch renames it."""
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones((), requires_grad=True))
    scale = internals.loss_scale(scaler)
    assert torch.is_tensor(scale) and scale.item() == 1024.0
    assert internals.loss_scale(None) is None


def test_zero_momentum_buffers_give_the_same_steps_as_torchs_lazy_ones():
    torch.manual_seed(0)
    ours, plain = nn.Linear(5, 3), nn.Linear(5, 3)
    plain.load_state_dict(ours.state_dict())
    cfg = TrainConfig(nesterov=True, weight_decay=5e-4)
    lazy = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=True)
    optimizers = [build.make_optimizer(cfg, ours, lr=0.1), lazy]
    x = torch.randn(8, 5)
    for _ in range(3):
        for model, optimizer in zip((ours, plain), optimizers):
            optimizer.zero_grad()
            model(x).square().sum().backward()
            optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), plain.parameters()))


def test_rng_states_of_more_gpus_than_visible_restore_those_that_exist(tmp_path, monkeypatch):
    """A checkpoint saved on 8 GPUs, resumed where 1 is visible: the first state is restored, no IndexError."""
    states = {"random_state": random.getstate(), "numpy_random_seed": np.random.get_state()}
    states |= {
        "torch_manual_seed": torch.get_rng_state(),
        "torch_cuda_manual_seed": [torch.tensor([i]) for i in range(8)],
    }
    torch.save(states, tmp_path / "random_states_0.pkl")
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((int(state), device)))
    assert restore_rng(tmp_path, 0)
    assert restored == [(0, 0)]


ON_GPU = "--num-workers must be 0 when the data is on the GPU"


@pytest.mark.parametrize(
    "options, device, processes, refused",
    [
        ({"num_workers": 2, "data_on_device": "yes"}, "cuda", 1, "--num-workers must be 0"),
        ({"num_workers": 2, "data_on_device": "auto"}, "cuda", 1, ON_GPU),
        ({"num_workers": 2, "data_on_device": "no"}, "cuda", 1, None),
        ({"num_workers": 2, "data_on_device": "yes"}, "cpu", 1, None),
        ({"sync_bn": True}, "cpu", 2, "--sync-bn needs GPUs"),
        ({"sync_bn": True}, "cpu", 1, None),
        ({"sync_bn": True}, "cuda", 2, None),
        ({"train_limit": 63, "batch_size": 16, "gradient_accumulation_steps": 2}, "cpu", 2, "one global batch of 64"),
        ({"train_limit": 64, "batch_size": 16, "gradient_accumulation_steps": 2}, "cpu", 2, None),
    ],
)
def test_what_the_launch_cannot_do_is_known_from_the_accelerator(options, device, processes, refused):
    """Decided from the Accelerator's device and process count alone: no data is needed to refuse it."""
    launch = SimpleNamespace(device=torch.device(device), num_processes=processes)
    problems = build.launch_problems(TrainConfig(**options), launch)
    assert (problems == []) if refused is None else (len(problems) == 1 and refused in problems[0])


def test_deterministic_turns_on_deterministic_kernels(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda on: calls.append(on))
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    build.configure_backends(torch.device("cpu"), threads=1, tf32=True, deterministic=True)
    assert calls == [True] and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_bf16_on_a_cpu_without_bf16_instructions_warns(monkeypatch):
    monkeypatch.setattr("distvgg.machine.cpu_has_bf16", lambda *a: False)
    with pytest.warns(UserWarning, match="without bf16 instructions"):
        build.warn_slow_bf16("bf16", torch.device("cpu"))
    monkeypatch.setattr("distvgg.machine.cpu_has_bf16", lambda *a: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning now fails the test
        build.warn_slow_bf16("bf16", torch.device("cpu"))  # none where the CPU has them
        build.warn_slow_bf16("no", torch.device("cpu"))  # nor without bf16
