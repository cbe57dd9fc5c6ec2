"""``mimkit import`` makes a run every other command takes; ``mimkit export`` writes timm and HF folders."""

import torch
from PIL import Image
from timm.models.beit import Beit
from timm.models.vision_transformer import VisionTransformer

from mimkit.cli import main
from mimkit.interop.keymaps import to_foreign
from mimkit.interop.mae import OFFICIAL_MAE
from mimkit.models.mae import MAE
from mimkit.runs import load_config
from mimkit.train.checkpoint_files import Checkpoints
from tests.conftest import IMPORT_SETS, TINY, grid_size


def reference_checkpoint(path):
    """An MAE reference-code checkpoint (`{"model": …}` with the decoder)."""
    torch.manual_seed(0)
    state, _ = to_foreign(MAE(**TINY).state_dict(), OFFICIAL_MAE)
    torch.save({"model": state}, path)


def test_imported_run_visualizes_continues_pretraining_and_fine_tunes(tmp_path, capsys):
    reference_checkpoint(tmp_path / "mae.pth")
    run = tmp_path / "run"
    imported = main(["import", str(tmp_path / "mae.pth"), "--format", "mae", "--out", str(run), *IMPORT_SETS])
    assert imported == 0
    out = capsys.readouterr().out
    assert "imported MAE reference checkpoint" in out and f"run directory: {run}" in out
    assert Checkpoints(run).latest() == 0

    assert main(["visualize", str(run), "--out", str(tmp_path / "recon.png"), "--n", "2"]) == 0
    assert Image.open(tmp_path / "recon.png").size == grid_size(4, 2, 32)

    # continued pretraining: the run's own configuration, the imported weights, a fresh optimizer
    assert main(["pretrain", "mae", "--out", str(run), "--max-steps", "2", "--batch-size", "8"]) == 0
    captured = capsys.readouterr()
    assert "resuming from step 0" in captured.out + captured.err
    assert Checkpoints(run).latest() == 2 and load_config(run).model.kwargs["embed_dim"] == 32

    assert main(["finetune", str(run), "--data", "synthetic:64", "--out", str(tmp_path / "ft"),
                 "--max-steps", "1", "--batch-size", "8", "--set", "data.num_workers=0"]) == 0


def test_export_to_timm_and_hf(tmp_path, capsys):
    reference_checkpoint(tmp_path / "mae.pth")
    run = tmp_path / "run"
    main(["import", str(tmp_path / "mae.pth"), "--format", "mae", "--out", str(run), *IMPORT_SETS])
    assert main(["export", str(run), "--to", "timm", "--out", str(tmp_path / "timm")]) == 0
    assert main(["export", str(run), "--to", "hf", "--out", str(tmp_path / "hf"), "--encoder-only"]) == 0
    assert {p.name for p in (tmp_path / "timm").iterdir()} == {"config.json", "model.safetensors"}
    assert {p.name for p in (tmp_path / "hf").iterdir()} == {"config.json", "model.safetensors",
                                                             "preprocessor_config.json"}
    assert "wrote" in capsys.readouterr().out


def test_bad_input_is_one_line_error(tmp_path, capsys):
    reference_checkpoint(tmp_path / "mae.pth")
    run = tmp_path / "run"
    main(["import", str(tmp_path / "mae.pth"), "--format", "mae", "--out", str(run), *IMPORT_SETS])
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    torch.save({"resnet.conv1.weight": torch.zeros(1)}, tmp_path / "resnet.pth")
    elsewhere = str(tmp_path / "x")
    cases = [
        (["import", str(tmp_path / "mae.pth"), "--format", "mae", "--out", str(run)], "already holds a run"),
        (["import", str(tmp_path / "nope.pth"), "--format", "mae", "--out", elsewhere], "does not exist"),
        (["import", str(tmp_path / "vit.pth"), "--format", "hf", "--out", elsewhere], "not a Hugging Face"),
        (["import", str(tmp_path / "resnet.pth"), "--format", "mae", "--out", elsewhere],
         "holds no tensor of a mae checkpoint (its keys start: resnet.conv1.weight)"),
        (["export", str(tmp_path / "nope"), "--to", "hf", "--out", elsewhere], "not a mimkit run"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and "\n" not in err, err


def test_imported_beit_run_exports(tmp_path):
    """The BEiT reference layout (shared relative position bias, layer scale, codebook head) as a run."""
    torch.manual_seed(0)
    beit = Beit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True, init_values=0.1,
                global_pool="token")
    head = {"mask_token": torch.randn(1, 1, 32), "lm_head.weight": torch.randn(24, 32),
            "lm_head.bias": torch.randn(24)}
    torch.save({"model": beit.state_dict() | head}, tmp_path / "beit.pth")
    run = tmp_path / "run"
    assert main(["import", str(tmp_path / "beit.pth"), "--format", "beit", "--out", str(run),
                 "--set", "data.num_workers=0"]) == 0
    config = load_config(run)
    assert config.method == "beit" and config.model.kwargs["vocab_size"] == 24
    assert config.data.mean == [0.5] * 3  # BEiT's normalization
    for target in ("timm", "hf"):
        assert main(["export", str(run), "--to", target, "--out", str(tmp_path / target)]) == 0
