"""data2vec through the command line: pretraining and resuming with its teacher, the teacher's update once per
optimizer step, pictures, exports to timm and transformers, the evaluation commands, one-line refusals of
bad settings, and the authors' checkpoints imported (built here from a tiny model in their key names, EMA
model and arguments) as well as transformers folders."""

import argparse
import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from timm.models.beit import Beit
from transformers import Data2VecVisionModel

from mimkit.cli import main
from mimkit.config import load_recipe
from mimkit.errors import MimkitError
from mimkit.interop.beit import OFFICIAL_BEIT
from mimkit.interop.importer import resolve_arch
from mimkit.interop.keymaps import to_foreign
from mimkit.methods.data2vec import read_official_data2vec, reference_hints
from mimkit.models.data2vec import Data2Vec
from mimkit.registry import method_of, read_config
from mimkit.runs import latest_weights, load_run
from mimkit.train.checkpoint_files import Checkpoints
from tests.conftest import every_evaluation_command, grid_size, perturb

COMMON = ["--data", "synthetic:64", "--batch-size", "8", "--set", "data.num_workers=0"]  # 32 px, 3 channels
TINY = ["--model", "vit_mini", "--set", "model.kwargs.depth=2", "--set", "model.kwargs.embed_dim=32",
        "--set", "model.kwargs.num_heads=2", "--set", "data2vec.top_k=2"]  # 8x8 grid of 4 px patches


def pretrain(out, *extra) -> int:
    return main(["pretrain", "data2vec", "--out", str(out), *COMMON, *TINY, *extra])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("data2vec") / "run"
    assert pretrain(out, "--max-steps", "2") == 0
    return out


@pytest.mark.slow
def test_pretrains_and_resumes_bit_for_bit_teacher_included(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    fast = ["--set", "data2vec.teacher_decay_end=0.5"]  # a teacher that moves visibly in 4 steps
    assert pretrain(straight, "--max-steps", "4", *fast) == 0
    assert pretrain(resumed, "--max-steps", "4", "--set", "train.checkpoint_every=2", *fast) == 0
    checkpoints = Checkpoints(resumed)
    checkpoints.weights_path(4).unlink()  # as if stopped after the checkpoint of step 2
    checkpoints.state_path(4).unlink()
    assert pretrain(resumed, "--max-steps", "4", *fast) == 0
    a, b = load_file(latest_weights(straight)), load_file(latest_weights(resumed))
    assert Checkpoints(resumed).latest() == 4 and a.keys() == b.keys()
    assert any(k.startswith("teacher.") for k in a) and all(torch.equal(a[k], b[k]) for k in a)
    first = load_file(Checkpoints(resumed).weights_path(2))
    key = "teacher.blocks.0.mlp.fc1.weight"
    assert not torch.equal(first[key], a[key]) and not torch.equal(a[key], a["encoder" + key[7:]])


def test_teacher_moves_once_per_optimizer_step_at_that_steps_decay(tmp_path, monkeypatch):
    decays = []
    update = Data2Vec.update_teacher
    monkeypatch.setattr(Data2Vec, "update_teacher", lambda model, decay: (decays.append(decay),
                                                                         update(model, decay)))
    assert pretrain(tmp_path / "accum", "--max-steps", "2", "--set", "train.accum_steps=2",
                    "--set", "data2vec.teacher_decay_start=0.5", "--set", "data2vec.teacher_decay_end=0.9",
                    "--set", "data2vec.teacher_anneal_steps=4") == 0
    assert decays == pytest.approx([0.5, 0.6])  # two optimizer steps of two micro-batches each


def test_the_runs_loss_beta_reaches_the_loss():
    """`data2vec.loss_beta` is the model's: 0 gives the squared error, 0.5 Smooth-L1 turning linear at 0.5,
    between the student's predictions and the teacher's targets at the masked patches."""
    data = {"source": "synthetic:64", "img_size": 32, "channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3}
    tiny = {"name": "vit_mini", "patch_size": 4, "kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2}}
    expected = {0.0: F.mse_loss, 0.5: partial(F.smooth_l1_loss, beta=0.5)}
    for beta, distance in expected.items():
        values = load_recipe("data2vec_fmnist") | {"data": data, "model": tiny,
                                                   "data2vec": {"top_k": 2, "loss_beta": beta}}
        config = read_config(values)
        torch.manual_seed(0)
        model = perturb(method_of("data2vec").build_model(config))
        view, loss_fn = method_of("data2vec").build_task(config, model)
        torch.manual_seed(0)
        samples = [view(torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8)) for _ in range(2)]
        batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
        with torch.no_grad():
            loss, _ = loss_fn(model, batch)
            x, _ = model.forward_features(batch["image"], batch["mask"])
            pred = model.forward_head(x, batch["mask"])
            targets = model.forward_targets(batch["image"])[batch["mask"]]
        torch.testing.assert_close(loss, distance(pred, targets))


def test_visualize_draws_image_mask_and_cosine_map(run, tmp_path):
    assert main(["visualize", str(run), "--out", str(tmp_path / "d2v.png"), "--n", "2"]) == 0
    assert Image.open(tmp_path / "d2v.png").size == grid_size(3, 2, 32)


def test_the_pictures_hide_the_masked_patches_and_draw_each_patchs_cosine_to_its_target(run):
    """The masked panel blanks what the student was shown as the mask token; the cosine panel is, per patch,
    the student's prediction (given that mask) against the teacher's target on the whole image."""
    model, config = load_run(run)
    torch.manual_seed(0)
    shown = torch.randn(2, 3, 32, 32)
    panels = method_of("data2vec").pictures(model, config, lambda size, mean, std: shown,
                                            torch.Generator().manual_seed(0))
    torch.testing.assert_close(panels["original"], shown)
    hidden = (panels["masked"] == 0).all(1)[:, ::4, ::4]  # [2, 8, 8]: a masked 4-px patch is zero
    assert hidden.any() and not hidden.all()
    pixels = hidden.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None].float()  # [2, 1, 32, 32]
    torch.testing.assert_close(panels["masked"], shown * (1 - pixels))
    with torch.no_grad():
        x, _ = model.forward_features(shown, hidden.flatten(1))
        pred, targets = model.lm_head(x[:, 1:]), model.forward_targets(shown)  # every patch's
    cosine = F.cosine_similarity(pred, targets, dim=-1)
    drawn = panels["cosine"][:, 0, ::4, ::4].flatten(1) * config.data.std[0] + config.data.mean[0]
    torch.testing.assert_close(drawn, (cosine + 1) / 2)


def test_exports_load_in_timm_and_transformers(run, tmp_path):
    model, _ = load_run(run)
    imgs = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, ::3] = True
    assert main(["export", str(run), "--to", "timm", "--out", str(tmp_path / "timm")]) == 0
    timm_model = Beit(**json.loads((tmp_path / "timm" / "config.json").read_text())["model_args"]).eval()
    timm_model.load_state_dict(load_file(tmp_path / "timm" / "model.safetensors"), strict=True)
    assert main(["export", str(run), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert main(["export", str(run), "--to", "hf", "--encoder-only", "--out", str(tmp_path / "enc")]) == 0
    hf = Data2VecVisionModel.from_pretrained(tmp_path / "hf").eval()
    assert "embeddings.mask_token" not in load_file(tmp_path / "enc" / "model.safetensors")
    assert Data2VecVisionModel.from_pretrained(tmp_path / "enc").embeddings.mask_token is None
    with torch.no_grad():
        torch.testing.assert_close(timm_model.forward_features(imgs), model.encoder.forward_features(imgs))
        ours, _ = model.forward_features(imgs, mask)
        assert (hf(imgs, bool_masked_pos=mask).last_hidden_state - ours).abs().max() <= 1e-5
    # and back: a transformers folder imports, its teacher a copy of the student
    assert main(["import", str(tmp_path / "hf"), "--format", "hf", "--out", str(tmp_path / "back")]) == 0
    back, config = load_run(tmp_path / "back")
    assert config.method == "data2vec"
    for key, value in back.encoder.state_dict().items():
        assert torch.equal(value, model.encoder.state_dict()[key])
        assert torch.equal(back.teacher.state_dict()[key], value)


@pytest.mark.slow
def test_evaluation_commands_take_a_data2vec_run(run, tmp_path):
    every_evaluation_command(run, tmp_path)


@pytest.mark.parametrize("setting, message", [
    ("data2vec.mask_ratio=1.0", "data2vec.mask_ratio"),
    ("data2vec.mask_ratio=0", "data2vec.mask_ratio"),
    ("data2vec.top_k=3", "data2vec.top_k=3 must be a number of blocks in 1..2"),
    ("data2vec.teacher_decay_end=1.5", "data2vec.teacher_decay_end"),
    ("data2vec.teacher_decay_start=-0.1", "data2vec.teacher_decay_start"),
    ("data2vec.target_norm=batch", "data2vec.target_norm' must be one of: layer, instance, none"),
])
def test_bad_setting_is_a_one_line_error(setting, message, tmp_path, capsys):
    assert pretrain(tmp_path / "bad", "--max-steps", "1", "--set", setting) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err, err


def reference_checkpoint(path, ema: bool = True, **args) -> tuple[Data2Vec, dict]:
    """A tiny data2vec saved as the authors' ``run_cyclical.py`` saves one: the student in their (BEiT's)
    names with the derived relative position index under "model", the EMA model under "model_ema", and the
    argparse arguments of their ViT-B command under "args"."""
    torch.manual_seed(0)
    model = perturb(Data2Vec(img_size=32, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2,
                             top_k=2, drop_path_rate=0.0))
    state, left = to_foreign({k: v for k, v in model.state_dict().items() if not k.startswith("teacher.")},
                             OFFICIAL_BEIT)
    assert left == []
    # the authors' names, written out (the map under test must not make its own fixture)
    assert {"cls_token", "mask_token", "patch_embed.proj.weight", "blocks.1.attn.qkv.weight",
            "blocks.1.gamma_2", "rel_pos_bias.relative_position_bias_table", "lm_head.weight"} <= state.keys()
    index = model.encoder.rel_pos_bias.relative_position_index
    saved = {"model": state | {"rel_pos_bias.relative_position_index": index}, "epoch": 799}
    if ema:
        saved["model_ema"] = {k: v + 1 for k, v in state.items()}  # a teacher unlike the student
    command = dict(target_layers="[0,1]", l1_beta=2.0, ema_decay=0.9998, ema_decay_init=0.999, ema_start_at=0,
                   num_mask_patches=40, min_mask_patches_per_block=4, layer_scale_init_value=1e-4,
                   drop_path=0.25, attn_drop_rate=0.05, layer_results="end", no_target_layer_norm_last=False,
                   target_batch_norm=False, target_instance_norm=False, post_target_instance_norm=False,
                   post_target_layer_norm=True)
    saved["args"] = argparse.Namespace(**(command | args))
    torch.save(saved, path)
    return model, saved


def test_reference_checkpoint_imports_student_teacher_and_arguments(tmp_path, capsys):
    model, saved = reference_checkpoint(tmp_path / "checkpoint-799.pth")
    out = tmp_path / "run"
    assert main(["import", str(tmp_path / "checkpoint-799.pth"), "--format", "data2vec", "--out", str(out),
                 "--set", "data.source=synthetic:64", "--set", "data.num_workers=0"]) == 0
    printed = capsys.readouterr().out
    assert "read from args.target_layers: top_k" in printed and "default" not in printed.split("normal")[0]
    imported, config = load_run(out)
    s = config.settings
    assert (s.top_k, s.loss_beta, s.min_block) == (2, 2.0, 4)
    assert (s.teacher_decay_start, s.teacher_decay_end, s.teacher_anneal_steps) == (0.999, 0.9998, 0)
    assert (s.mask_ratio, s.block_norm, s.target_norm) == (40 / 64, "layer", "layer")
    assert config.model.kwargs["attn_drop_rate"] == 0.05 and config.model.kwargs["drop_path_rate"] == 0.25
    assert (config.data.mean, config.data.std) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])  # ImageNet's
    ours = imported.state_dict()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ours.items() if not k.startswith("teacher."))
    assert torch.equal(ours["teacher.blocks.1.mlp.fc2.weight"], saved["model_ema"]["blocks.1.mlp.fc2.weight"])
    assert pretrain(out, "--max-steps", "1") == 0  # continues from the imported weights


def test_reference_weights_without_ema_or_arguments_are_reported(tmp_path, capsys):
    path = tmp_path / "bare.pth"
    model, saved = reference_checkpoint(path, ema=False)
    del saved["args"]
    torch.save(saved, path)
    assert main(["import", str(path), "--format", "data2vec", "--out", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert "default top_k 2 (the authors' ViT-B command's); if not, --set data2vec.top_k=..." in printed
    assert "the teacher starts as a copy of the student" in printed
    imported, config = load_run(tmp_path / "run")
    torch.testing.assert_close(imported.teacher.state_dict(), imported.encoder.state_dict(), rtol=0, atol=0)
    s = config.settings  # the authors' ViT-B command's
    assert (s.mask_ratio, s.block_norm, s.target_norm, s.loss_beta) == (120 / 196, "layer", "layer", 2.0)
    assert (s.teacher_decay_start, s.teacher_decay_end, s.teacher_anneal_steps) == (0.999, 0.9998, 0)


def test_a_reference_checkpoint_saved_under_ddp_imports_alike(tmp_path):
    """Student and teacher under DDP's ``module.`` prefix read as without it."""
    _, saved = reference_checkpoint(tmp_path / "plain.pth")
    plain = read_official_data2vec(tmp_path / "plain.pth")
    for part in ("model", "model_ema"):
        saved[part] = {"module." + k: v for k, v in saved[part].items()}
    torch.save(saved, tmp_path / "ddp.pth")
    ddp = read_official_data2vec(tmp_path / "ddp.pth")
    assert ddp.unexpected == plain.unexpected == [] and ddp.state.keys() == plain.state.keys()
    assert all(torch.equal(ddp.state[k], plain.state[k]) for k in plain.state)


@pytest.mark.parametrize("args, message", [
    ({"target_layers": "[0]", "layer_results": "fc"}, "--layer_results fc: mimkit's targets are the blocks'"),
    ({"target_layers": "[0]"}, r"--target_layers \[0\]: mimkit averages the top K blocks \(of 2\)"),
    ({"target_batch_norm": True}, "--target_batch_norm"),
    ({"post_target_instance_norm": True}, "normalizing the average twice"),
    ({"ema_annealing_till_end": True}, "--ema_annealing_till_end: its anneal length is the run's"),
])
def test_reference_targets_mimkit_cannot_build_are_refused(tmp_path, args, message):
    reference_checkpoint(tmp_path / "ckpt.pth", **args)
    with pytest.raises(MimkitError, match=message):
        resolve_arch(read_official_data2vec(tmp_path / "ckpt.pth"))


def test_reference_target_layers_with_a_gap_are_refused():
    assert reference_hints({"target_layers": "[1, 2]"}, 3, 64)[0]["top_k"] == 2
    with pytest.raises(MimkitError, match=r"--target_layers \[0, 2\]: mimkit averages the top K blocks"):
        reference_hints({"target_layers": "[0, 2]"}, 3, 64)


@pytest.mark.parametrize("args, block_norm, target_norm", [
    ({}, "layer", "none"),  # the authors' default: each block layer-normalized, the average not
    ({"no_target_layer_norm_last": True}, "none", "none"),
    ({"no_target_layer_norm_last": True, "target_instance_norm": True, "post_target_layer_norm": True},
     "instance", "layer"),
])
def test_reference_normalization_flags_give_the_block_and_target_norms(args, block_norm, target_norm):
    fields, _ = reference_hints(args, 2, 64)
    assert (fields["block_norm"], fields["target_norm"]) == (block_norm, target_norm)


def test_reference_arguments_without_the_mask_count_leave_the_ratio_to_the_default(tmp_path):
    _, saved = reference_checkpoint(tmp_path / "ckpt.pth")
    del saved["args"].num_mask_patches
    torch.save(saved, tmp_path / "ckpt.pth")
    foreign = read_official_data2vec(tmp_path / "ckpt.pth")
    assert "mask_ratio" not in foreign.hints and foreign.hints["top_k"] == 2


@pytest.mark.parametrize("saved", [{"epoch": 799}, {"model": {"blocks.0.norm1.weight": [1.0]}}],
                         ids=["no model", "not tensors"])
def test_a_file_without_a_state_dict_is_a_one_line_error(tmp_path, saved):
    torch.save(saved, tmp_path / "ckpt.pth")
    with pytest.raises(MimkitError, match="holds no data2vec state dict"):
        read_official_data2vec(tmp_path / "ckpt.pth")
