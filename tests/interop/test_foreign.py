"""What every foreign reader shares: `convert` (renamed weights with their source) and `unknown_name`."""

import torch

from mimkit.interop.foreign import convert, unknown_name
from mimkit.interop.mae import OFFICIAL_MAE_MODELS


def test_convert_renames_drops_the_ignored_and_keeps_what_was_read():
    state = {"theirs.w": torch.ones(2), "theirs.index": torch.zeros(1), "stray": torch.zeros(1)}
    foreign = convert("mae", state, {"w": "theirs.w"}, "ckpt.pth", ignore=[r"\.index$"], mean=[0.5],
                      std=[0.25])
    assert foreign.method == "mae" and foreign.source == "ckpt.pth"
    assert foreign.state.keys() == {"w"} and torch.equal(foreign.state["w"], state["theirs.w"])
    assert foreign.unexpected == ["stray"] and (foreign.mean, foreign.std) == ([0.5], [0.25])


def test_only_a_model_name_the_reference_code_does_not_define_gets_a_note():
    assert unknown_name({"model": "mae_vit_base_patch16"}, OFFICIAL_MAE_MODELS) == []
    assert unknown_name({}, OFFICIAL_MAE_MODELS) == []  # no name: nothing to say
    assert unknown_name({"model": "mae_vit_custom"}, OFFICIAL_MAE_MODELS) == [
        "args.model 'mae_vit_custom' is not a released model name: it fixes no dimension"]
