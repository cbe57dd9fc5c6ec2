"""MAE's method record: the pictures at the run's own mask ratio and the start-up summary."""

import pytest
import torch

from mimkit.errors import MimkitError
from mimkit.registry import method_of, read_config
from mimkit.viz import mae_reconstructions

DATA = {"source": "synthetic:8", "img_size": 32, "channels": 1, "mean": [0.5], "std": [0.5]}
TINY = {"depth": 1, "embed_dim": 32, "num_heads": 2, "decoder_depth": 1, "decoder_embed_dim": 32,
        "decoder_num_heads": 2}


def mae_config(**settings):
    return read_config({"method": "mae", "data": DATA, "model": {"name": "vit_mini", "patch_size": 8,
                                                                 "kwargs": TINY}, "mae": settings})


@pytest.mark.parametrize("mask_ratio, hidden", [(0.5, 8), (0.25, 4)])
def test_the_pictures_hide_the_runs_share_of_patches_drawn_from_the_generator(mask_ratio, hidden):
    config = mae_config(mask_ratio=mask_ratio, norm_pix_loss=False)
    record = method_of("mae")
    torch.manual_seed(0)
    model = record.build_model(config).eval()
    shown = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        panels = record.pictures(model, config, lambda size, mean, std: shown,
                                 torch.Generator().manual_seed(3))
        noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(3))
        expected = mae_reconstructions(model, shown, mask_ratio, noise)
    blank = (panels["masked"] == 0).reshape(2, 4, 8, 4, 8).all(4).all(2)  # [2, 4, 4] hidden patches
    assert blank.flatten(1).sum(1).tolist() == [hidden, hidden]
    for name, panel in expected.items():
        torch.testing.assert_close(panels[name], panel, msg=name)


def test_the_start_up_summary_tells_the_share_masked():
    assert method_of("mae").describe(mae_config(mask_ratio=0.6)) == ", 60% masked"


def test_a_mask_ratio_that_keeps_no_patch_is_refused_before_training():
    config = mae_config(mask_ratio=0.95)  # int(16 * 0.05): none of the 16 patches kept
    record = method_of("mae")
    with pytest.raises(MimkitError, match="mask_ratio 0.95 must lie in"):
        record.build_task(config, record.build_model(config))
