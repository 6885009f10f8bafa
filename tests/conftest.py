import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs one worker per core: a second intra-op thread per worker (or per process a test starts)
    # would only contend for the same cores.
    torch.set_num_threads(int(os.environ.setdefault("OMP_NUM_THREADS", "1")))

# A small model on the shipped corpus: a CLI run of a few steps takes seconds on a 2-core CPU.
TINY = [
    "--config",
    "conf/lm/shakespeare.yaml",
    "--model.arch.n_layers",
    "2",
    "--model.arch.d_model",
    "32",
    "--model.arch.n_heads",
    "2",
    "--model.arch.vocab_size",
    "512",
    "--data.vocab_size",
    "512",
    "--data.seq_len",
    "32",
    "--data.batch_size",
    "4",
    "--trainer.limit_val_batches",
    "2",
    "--trainer.limit_test_batches",
    "2",
    "--trainer.val_check_interval",
    "3",
    "--trainer.log_every_n_steps",
    "1",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
    "--model.sampling.max_new_tokens",
    "8",
]


@pytest.fixture(scope="session", autouse=True)
def shared_cache(tmp_path_factory):
    """One tokenizer/token cache for the session (subprocesses inherit it); never the user's home cache."""
    previous = os.environ.get("LIT_IIET_CACHE")
    os.environ["LIT_IIET_CACHE"] = str(tmp_path_factory.mktemp("lit_iiet_cache"))
    yield
    if previous is None:
        os.environ.pop("LIT_IIET_CACHE", None)
    else:
        os.environ["LIT_IIET_CACHE"] = previous


@pytest.fixture(autouse=True)
def in_repo_root(monkeypatch):
    """Configs name data/ and conf/ relative to the repository root, as users run them."""
    monkeypatch.chdir(ROOT)


@pytest.fixture
def hf_offline(tmp_path, monkeypatch):
    """`datasets` in offline mode with its caches under tmp_path, whenever it was first imported."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-home" / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return datasets
