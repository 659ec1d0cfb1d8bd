"""Test-wide isolation: no test writes to the user's caches, W&B or Hugging Face folders."""

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_environment(tmp_path_factory):
    root = tmp_path_factory.mktemp("env")
    saved = dict(os.environ)
    os.environ.update(
        {
            "DISTVGG_CACHE": str(root / "distvgg-cache"),
            "HF_HOME": str(root / "hf"),
            "HF_DATASETS_CACHE": str(root / "hf" / "datasets"),
            "WANDB_DIR": str(root / "wandb"),
            "WANDB_MODE": "offline",
            "WANDB_SILENT": "true",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
        }
    )
    os.environ.pop("WANDB_API_KEY", None)
    yield
    os.environ.clear()
    os.environ.update(saved)
