"""Layer-wise lr decay reaches the optimizer step: the lr each parameter actually moves by, in the loop
and in a fine-tuning run (not only the ``lr_scale`` that `param_groups` returns)."""

import pytest
import torch
from torch import nn

from mimkit.cli import main
from mimkit.data.loader import SeededViews
from mimkit.models.beit import create_beit
from mimkit.models.mae import create_mae
from mimkit.train.checkpoint_files import Checkpoints
from mimkit.train.distributed import World
from mimkit.train.loop import LoopOptions, train
from mimkit.train.optim import build_adamw, param_groups
from mimkit.train.schedule import Schedule
from tests.conftest import run_records

CPU = World(rank=0, size=1, device=torch.device("cpu"))


class Features(torch.utils.data.Dataset):
    """16 random 4-d 'images' with a regression target."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(16, 4, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(i % 2)


class Blocks(nn.Module):
    """An embedding token, ``depth`` blocks and a head: the three kinds of layer ids."""

    def __init__(self, depth: int = 3):
        super().__init__()
        self.cls_token = nn.Parameter(torch.full((4,), 0.1))
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(depth))
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        x = x + self.cls_token
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(x).squeeze(-1)


def squared_error(model, batch):
    return ((model(batch["image"]) - batch["label"].float()) ** 2).mean(), {}


def test_each_layer_moves_by_its_decayed_lr(tmp_path):
    """AdamW's first step moves every weight with a non-zero gradient by lr (m / sqrt(v) = sign(g)), so
    the largest change of a parameter is the lr its group got in that step."""
    torch.manual_seed(0)
    model, depth, lr, decay = Blocks(), 3, 1e-2, 0.5
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = build_adamw(param_groups(model, weight_decay=0.0, layer_decay=decay, num_layers=depth))
    train(model, squared_error, SeededViews(Features(), lambda x: {"image": x}), optimizer,
          Schedule(1, [lr]), CPU, LoopOptions(batch_size=16), **run_records(tmp_path))
    expected_scale = {"cls_token": decay ** (depth + 1), "head.weight": 1.0, "head.bias": 1.0}
    expected_scale |= {f"blocks.{i}.{kind}": decay ** (depth - i) for i in range(depth)
                       for kind in ("weight", "bias")}
    for name, p in model.named_parameters():
        moved = (p.detach() - before[name]).abs().max().item()
        assert moved == pytest.approx(lr * expected_scale[name], rel=1e-4), name


def test_finetune_runs_with_layer_decay(mae_run, tmp_path):
    """The optimizer state of a one-step fine-tuning run: four lrs, one per depth of a 2-block encoder
    (embeddings, block 0, block 1, head and norm), each ``layer_decay`` times the next."""
    out = tmp_path / "ft"
    assert main(["finetune", str(mae_run), "--data", "synthetic", "--out", str(out), "--max-steps", "1",
                 "--batch-size", "32", "--set", "data.num_workers=0", "--set", "optim.warmup_epochs=0",
                 "--set", "optim.layer_decay=0.5", "--set", "eval_batch_size=256"]) == 0
    state = torch.load(Checkpoints(out).state_path(1), weights_only=True)
    lrs = sorted({group["lr"] for group in state["optimizer"]["param_groups"]})
    top = 2e-3 * 32 / 256  # finetune_fmnist's base_lr x batch / 256, the first step of the cosine
    assert lrs == pytest.approx([top * 0.5 ** 3, top * 0.5 ** 2, top * 0.5, top], rel=1e-6)


def test_matrices_declared_or_named_as_tokens_get_no_weight_decay():
    """Beyond the 1-D tensors: timm's declared names (BEiT's relative position tables) and the tokens and
    position tables by name (the MAE's and BEiT's mask token, which no module declares)."""
    beit = create_beit("vit_mini", img_size=16, patch_size=4, in_chans=1, vocab_size=8, depth=1)
    mae = create_mae("vit_mini", img_size=16, patch_size=4, in_chans=1, depth=1, decoder_depth=1)
    for model, matrices in ((beit, {"encoder.blocks.0.attn.relative_position_bias_table", "encoder.cls_token",
                                    "mask_token"}),
                            (mae, {"encoder.cls_token", "mask_token"})):  # its sin-cos tables are frozen
        groups = param_groups(model, weight_decay=0.05)
        no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
        shapes = dict(model.named_parameters())
        assert {n for n in no_decay if shapes[n].ndim > 1} == matrices


def test_frozen_parameters_are_left_out_and_the_decay_and_betas_reach_adamw():
    """A frozen part (a teacher, fixed position tables) is no one's to update; the matrices get the weight
    decay asked, the 1-D tensors none, and every group the betas asked, with the lr the loop sets."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    model[0].requires_grad_(False)
    groups = param_groups(model, weight_decay=0.3)
    assert [g["names"] for g in groups] == [["1.weight"], ["1.bias"]]
    optimizer = build_adamw(groups, betas=(0.8, 0.9))
    assert [(g["weight_decay"], g["betas"], g["lr_scale"], g["lr"]) for g in optimizer.param_groups] == [
        (0.3, (0.8, 0.9), 1.0, 0.0), (0.0, (0.8, 0.9), 1.0, 0.0)]
    assert all("names" not in g for g in optimizer.param_groups)
