"""Every transformer block runs once, in index order, on every forward path, and what a path takes at
"layer k" (1-based, as the CLI says) is block k's output.

A fresh planted set found BEiT's ``forward_features`` taking block 0 (Python's -1, the last block): the tests
checked shapes and losses, which a block taken off by one keeps. Here forward hooks on every block list
(any ``...blocks`` `nn.ModuleList` or `nn.Sequential`) record which blocks run and what each gives, at depth
3 (first, middle and last differ), for each method's pretraining step, the classifier, `block_features`
(``--layer``), the segmentation backbone's taken blocks, BEiT's ``forward_features(layers=...)`` and
data2vec's top-K targets.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mimkit.models.beit import beit_vit_mini
from mimkit.models.classifier import block_features, build_classifier, pooled_features
from mimkit.models.data2vec import normalize_targets
from mimkit.models.segmentation import Segmenter
from mimkit.models.vit import build_vit
from mimkit.registry import method_of, read_config
from tests.methods.test_settings_reach import DATA, dvae_file, first_step, located, vqkd_run  # noqa: F401

DEPTH = 3
VIT = {"depth": DEPTH, "embed_dim": 32, "num_heads": 2}
BASES = {  # each method's settings at depth 3, and its own block lists' sizes where it has more
    "mae": ({"decoder_depth": 2, "decoder_embed_dim": 32, "decoder_num_heads": 2}, {}),
    "simmim": ({}, {"mask_patch_size": 8}),
    "maskfeat": ({}, {"hog_cell": 4}),
    "data2vec": ({}, {"top_k": 2}),
    "beit": ({}, {"tokenizer": "DVAE"}),
    "beitv2": ({}, {"tokenizer": "VQKD"}),
    "cae": ({"regressor_depth": 2, "decoder_depth": 2}, {"tokenizer": "DVAE"}),
    "caev2": ({"regressor_depth": 2}, {"target": "teacher", "teacher": "MAE", "align_weight": 0.0}),
    "maskdistill": ({}, {"teacher": "MAE"}),
    "vqkd": ({}, {"teacher": "MAE", "vocab_size": 32, "decoder_depth": 2}),
}
# a block list a pretraining step runs more than once: CAE's encoder also encodes the masked patches, the
# target of its alignment loss
RUNS = {("cae", "encoder.blocks"): 2}


def block_lists(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules()
            if name.endswith("blocks") and isinstance(m, nn.ModuleList | nn.Sequential) and len(m)}


def recorded(model: nn.Module) -> list[tuple[str, int, torch.Tensor]]:
    """A list that fills with (block list, index, output) as the model's blocks run."""
    seen = []
    for name, blocks in block_lists(model).items():
        for i, block in enumerate(blocks):
            block.register_forward_hook(lambda m, args, out, name=name, i=i: seen.append((name, i, out)))
    return seen


def runs_of(seen, name: str) -> list[int]:
    return [i for n, i, _ in seen if n == name]


def output_of(seen, name: str, index: int) -> torch.Tensor:
    """The output of block ``index`` of list ``name`` the first time it ran."""
    return next(o for n, i, o in seen if (n, i) == (name, index))


def assert_each_list_runs_in_order(model: nn.Module, seen, runs: dict[str, int] | None = None,
                                   last: dict[str, int] | None = None) -> None:
    """Each block list ran its blocks in index order, ``runs`` times (once unless named), up to block
    ``last`` (its end unless named: a path that stops early)."""
    for name, blocks in block_lists(model).items():
        end = (last or {}).get(name, len(blocks) - 1)
        assert runs_of(seen, name) == list(range(end + 1)) * (runs or {}).get(name, 1), name


@pytest.mark.parametrize("name", BASES)
def test_a_pretraining_step_runs_each_block_once_in_order(name, dvae_file, mae_run, vqkd_run):  # noqa: F811
    method = "cae" if name == "caev2" else name
    arch, own = BASES[name]
    _, _, model, loss_fn, batch, scheduled = first_step(method, located(own, dvae_file, mae_run, vqkd_run),
                                                        VIT | arch)
    seen = recorded(model)
    loss_fn(model, batch | {key: values[3] for key, values in scheduled.items()})
    assert len(block_lists(model)["encoder.blocks"]) == DEPTH
    assert_each_list_runs_in_order(model, seen, {n: k for (m, n), k in RUNS.items() if m == name})


ENCODERS = {"vit": lambda: build_vit("vit_mini", img_size=32, patch_size=8, **VIT),
            "beit": lambda: beit_vit_mini(img_size=32, patch_size=8, vocab_size=16, **VIT).encoder}


def perturbed(build) -> nn.Module:
    torch.manual_seed(0)
    model = build()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("encoder", ENCODERS)
def test_the_classifier_runs_each_block_once_in_order(encoder):
    model = build_classifier(perturbed(ENCODERS[encoder]), 3).eval()
    seen = recorded(model)
    model(torch.randn(2, 3, 32, 32))
    assert_each_list_runs_in_order(model, seen)


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("pool", ["avg", "cls"])
@pytest.mark.parametrize("layers", [(1,), (2,), (3,), (1, 2, 3), (1, 3)])
def test_a_probes_layer_k_is_block_ks_output(encoder, pool, layers):
    """``--layer k`` (and ``all``) reads block k (1-based): the pooled, parameter-free normalized tokens of
    block k, the encoder's own pooled features at the last; the blocks run once, up to the last asked."""
    model = perturbed(ENCODERS[encoder])
    images = torch.randn(2, 3, 32, 32)
    seen = recorded(model)
    with torch.no_grad():
        got = block_features(model, images, pool, layers)
        assert_each_list_runs_in_order(model, seen, last={"blocks": max(layers) - 1})
        final = pooled_features(model, images, pool)
    for column, k in enumerate(layers):
        tokens = output_of(seen, "blocks", k - 1)
        pooled = tokens[:, model.num_prefix_tokens:].mean(1) if pool == "avg" else tokens[:, 0]
        expected = final if k == DEPTH else F.layer_norm(pooled, pooled.shape[-1:], eps=1e-6)
        torch.testing.assert_close(got[:, column], expected)


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("head, named, taken", [("upernet", [0, 1, 2, 2], [0, 1, 2, 2]),
                                                ("upernet", [0, 0, 1, 1], [0, 0, 1, 1]),
                                                ("upernet", [2, 1, 0, 0], [2, 1, 0, 0]),
                                                ("linear", None, [DEPTH - 1])])
def test_the_segmentation_backbone_takes_the_blocks_it_names(encoder, head, named, taken):
    """UperNet's four blocks in the order named (0-based), the linear head's the last block."""
    model = Segmenter(perturbed(ENCODERS[encoder]), 3, head=head, blocks=named).eval()
    seen = recorded(model.encoder)
    with torch.no_grad():
        maps = model.forward_features(torch.randn(2, 3, 32, 32))
    assert_each_list_runs_in_order(model.encoder, seen, last={"blocks": max(taken)})
    for block, feature_map in zip(taken, maps, strict=True):
        tokens = output_of(seen, "blocks", block)[:, model.encoder.num_prefix_tokens:]
        torch.testing.assert_close(feature_map, tokens.transpose(1, 2).reshape(feature_map.shape))


@pytest.mark.parametrize("layers", [(1,), (2,), (3,), (1, 3)])
def test_beits_forward_features_returns_the_blocks_it_names(layers):
    model = perturbed(lambda: beit_vit_mini(img_size=32, patch_size=8, vocab_size=16, **VIT))
    seen = recorded(model)
    with torch.no_grad():
        _, hidden = model.forward_features(torch.randn(2, 3, 32, 32), torch.zeros(2, 16, dtype=torch.bool),
                                           layers)
    assert_each_list_runs_in_order(model, seen)
    assert len(hidden) == len(layers)
    for k, tokens in zip(layers, hidden, strict=True):
        torch.testing.assert_close(tokens, output_of(seen, "encoder.blocks", k - 1))


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_data2vecs_targets_average_the_teachers_top_k_blocks(top_k):
    config = read_config({"method": "data2vec", "data": DATA,
                          "model": {"name": "vit_mini", "patch_size": 8, "kwargs": VIT},
                          "data2vec": {"top_k": top_k, "target_norm": "none"}})
    model = perturbed(lambda: method_of("data2vec").build_model(config))
    seen = recorded(model)
    with torch.no_grad():
        targets = model.forward_targets(torch.randn(2, 3, 32, 32))
    assert runs_of(seen, "teacher.blocks") == list(range(DEPTH))
    top = [output_of(seen, "teacher.blocks", i)[:, 1:] for i in range(DEPTH - top_k, DEPTH)]
    torch.testing.assert_close(targets, sum(normalize_targets(x, model.block_norm) for x in top) / top_k)
