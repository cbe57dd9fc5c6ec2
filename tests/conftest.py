"""Shared test set-up."""

import pytest
import torch

from mimkit.cli import main

TINY_MAE_KWARGS = ("depth=2", "embed_dim=32", "num_heads=2", "decoder_depth=1", "decoder_embed_dim=32",
                   "decoder_num_heads=2")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tests' tiny models run fastest on one thread; two threads on a busy 2-core machine thrash."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mae_run(tmp_path_factory):
    """A tiny MAE pretrained for 2 steps on synthetic data (32 px, 3 channels, 2 blocks of width 32): the
    encoder the evaluation tests read. Treat it as read-only."""
    run = tmp_path_factory.mktemp("eval") / "mae"
    tiny = [arg for kv in TINY_MAE_KWARGS for arg in ("--set", f"model.kwargs.{kv}")]
    assert main(["pretrain", "mae", "--data", "synthetic", "--out", str(run), "--max-steps", "2",
                 "--batch-size", "32", "--set", "data.num_workers=0", *tiny]) == 0
    return run
