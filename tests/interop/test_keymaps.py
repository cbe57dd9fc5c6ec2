"""Key maps: templates filled from the keys present, fused tensors split and joined, zero pieces."""

import pytest
import torch

from mimkit.errors import MimkitError
from mimkit.interop.keymaps import block_count, expand, from_foreign, nest, rename, to_foreign

KEYMAP = nest({"w": "weight", "qkv": ("q", "k", "v"), "bias": ("q_bias", None, "v_bias")},
              "blocks.{i}.", "layer.{i}.")


def test_templates_follow_the_blocks_present():
    """Block numbers of one digit and of two (a ViT-B has blocks 0-11)."""
    assert expand(KEYMAP, ["layer.0.weight", "layer.3.weight", "layer.11.weight"], ours=False) == {
        "blocks.0.w": "layer.0.weight", "blocks.3.w": "layer.3.weight", "blocks.11.w": "layer.11.weight"}
    for i in (1, 23):
        fused = expand(KEYMAP, [f"blocks.{i}.qkv"], ours=True)[f"blocks.{i}.qkv"]
        assert fused == (f"layer.{i}.q", f"layer.{i}.k", f"layer.{i}.v")


def test_round_trip_is_bit_identical_and_unknown_keys_are_reported():
    ours = {"blocks.0.w": torch.randn(2, 2), "blocks.0.qkv": torch.randn(6, 2),
            "blocks.0.bias": torch.cat([torch.randn(2), torch.zeros(2), torch.randn(2)]),
            "extra": torch.ones(1)}
    theirs, unmapped = to_foreign(ours, KEYMAP)
    assert unmapped == ["extra"] and set(theirs) == {"layer.0.weight", "layer.0.q", "layer.0.k", "layer.0.v",
                                                     "layer.0.q_bias", "layer.0.v_bias"}
    back, unexpected = from_foreign(theirs | {"layer.0.index": torch.ones(1), "other": torch.ones(1)}, KEYMAP,
                                    ignore=[r"\.index$"])
    assert unexpected == ["other"]
    assert back.keys() == ours.keys() - {"extra"} and all(torch.equal(back[k], ours[k]) for k in back)


def test_a_nonzero_piece_the_layout_does_not_store_is_refused():
    with pytest.raises(MimkitError, match="blocks.0.bias has a nonzero part that this layout does not store"):
        to_foreign({"blocks.0.bias": torch.ones(6)}, KEYMAP)


def test_a_fused_tensor_missing_a_stored_piece_is_left_out_and_its_pieces_reported():
    """A checkpoint holding the query and value but not the key is not fused from what is there: the
    tensor is missing (reported by the importer) and the pieces are unexpected."""
    out, unexpected = from_foreign({"layer.0.q": torch.ones(2), "layer.0.v": torch.ones(2)}, KEYMAP)
    assert out == {} and unexpected == ["layer.0.q", "layer.0.v"]


def test_a_fused_tensor_that_does_not_split_into_equal_parts_is_refused():
    """Five rows cannot be a query, key and value of equal size: refused, not cut 2, 2, 1 (nor, two rows,
    into two pieces of the three)."""
    for rows in (5, 2):
        with pytest.raises(MimkitError, match=f"blocks.0.qkv has {rows} rows: not 3 equal parts"):
            to_foreign({"blocks.0.qkv": torch.randn(rows, 2)}, KEYMAP)


def test_a_tensor_in_two_pieces_one_of_them_zeros_splits_and_joins_back():
    """Two pieces (not only a query-key-value three), and a tensor whose one stored piece is followed by
    zeros the layout does not store: split in halves, joined back, the zeros made in the stored piece's
    shape."""
    keymap = {"kv": ("k", "v"), "gate": ("g", None)}
    ours = {"kv": torch.randn(4, 3), "gate": torch.cat([torch.randn(2, 3), torch.zeros(2, 3)])}
    theirs, unmapped = to_foreign(ours, keymap)
    assert unmapped == [] and theirs.keys() == {"k", "v", "g"}
    assert torch.equal(theirs["k"], ours["kv"][:2]) and torch.equal(theirs["v"], ours["kv"][2:])
    assert torch.equal(theirs["g"], ours["gate"][:2])
    back, unexpected = from_foreign(theirs, keymap)
    assert unexpected == [] and back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)


def test_block_count_is_one_past_the_highest_block_and_zero_without_any():
    keys = ["encoder.blocks.0.w", "encoder.blocks.11.w", "decoder_blocks.3.w", "encoder.norm.w"]
    assert block_count(keys, "encoder.blocks.") == 12 and block_count(keys, "decoder_blocks.") == 4
    assert block_count(keys, "agg_blocks.") == 0  # an encoder-only file has no such blocks


def test_templates_are_filled_from_keys_given_once_as_an_iterator():
    """The keys may be any iterable, read once: every template sees them all."""
    keys = iter(["layer.0.weight", "layer.0.q", "layer.0.k", "layer.0.v"])
    assert expand(KEYMAP, keys, ours=False) == {
        "blocks.0.w": "layer.0.weight", "blocks.0.qkv": ("layer.0.q", "layer.0.k", "layer.0.v")}


def test_renames_apply_in_order_to_every_key():
    state = {"blocks.0.gamma_1": torch.ones(1), "norm.weight": torch.zeros(1)}
    rules = [(r"gamma_(\d)", r"ls\1.gamma"), (r"^blocks\.", "encoder.blocks."), ("ls1", "layer_scale1")]
    out = rename(state, rules)  # the third rule sees the first's result
    assert list(out) == ["encoder.blocks.0.layer_scale1.gamma", "norm.weight"]
    assert out["encoder.blocks.0.layer_scale1.gamma"] is state["blocks.0.gamma_1"]
