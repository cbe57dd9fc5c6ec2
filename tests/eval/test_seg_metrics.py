"""Segmentation scores on hand-computed confusion matrices, the ignore index, and sliding-window inference."""

import math

import pytest
import torch
from torch import nn

from mimkit.errors import MimkitError
from mimkit.eval.seg_metrics import (
    confusion_matrix,
    predict_logits,
    segmentation_scores,
    sliding_logits,
    whole_logits,
)


def test_confusion_matrix_counts_truth_rows_prediction_columns_and_skips_ignored_pixels():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
    expected = torch.tensor([[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    assert torch.equal(confusion_matrix(pred, target, 3), expected)


def test_scores_of_a_hand_computed_matrix():
    # truth 0: 1 right, 1 as class 1; truth 1: 2 right; truth 2: 1 right, 1 as class 0; class 3 nowhere
    matrix = torch.tensor([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    scores = segmentation_scores(matrix, ["a", "b", "c", "d"])
    assert scores["aAcc"] == pytest.approx(100 * 4 / 6)
    # IoU: a 1/(2+2-1)=1/3, b 2/(2+3-2)=2/3, c 1/(2+1-1)=1/2; d has none (absent and never predicted)
    assert scores["mIoU"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 / 2) / 3)
    # Acc: a 1/2, b 1, c 1/2; d has none
    assert scores["mAcc"] == pytest.approx(100 * (0.5 + 1 + 0.5) / 3)
    assert scores["per_class"][0] == {"class": "a", "IoU": 33.33, "Acc": 50.0}
    assert scores["per_class"][3] == {"class": "d", "IoU": None, "Acc": None}


def test_a_predicted_class_absent_from_the_truth_counts_as_zero_iou_but_has_no_acc():
    scores = segmentation_scores(torch.tensor([[1, 1], [0, 0]]))
    assert scores["per_class"][1] == {"class": "class_1", "IoU": 0.0, "Acc": None}
    assert scores["mIoU"] == pytest.approx(25.0) and scores["mAcc"] == pytest.approx(50.0)


def test_only_ignored_pixels_give_no_scores():
    matrix = confusion_matrix(torch.zeros(4, 4), torch.full((4, 4), 255), 2)
    assert matrix.sum() == 0 and math.isnan(segmentation_scores(matrix)["mIoU"])


def test_a_label_past_the_classes_is_an_error():
    with pytest.raises(MimkitError, match="label 3"):
        confusion_matrix(torch.zeros(2, 2), torch.tensor([[0, 3], [1, 255]]), 3)


class PixelModel(nn.Module):
    """A fixed-input 'segmenter': per-pixel linear logits plus a term that depends on the whole crop, so
    averaging windows differs from one pass unless the window is the image."""

    def __init__(self, crop: int):
        super().__init__()
        self.crop = crop
        self.proj = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        assert x.shape[2:] == (self.crop, self.crop)
        return self.proj(x) + x.mean(dim=(1, 2, 3))[:, None, None, None]


def test_sliding_window_equals_whole_image_when_the_crop_covers_it():
    torch.manual_seed(0)
    model, images = PixelModel(16), torch.randn(2, 3, 16, 16)
    whole = whole_logits(model, images, 16)
    torch.testing.assert_close(sliding_logits(model, images, crop=16, stride=10), whole)


def test_sliding_window_averages_overlapping_windows():
    torch.manual_seed(0)
    model, images = PixelModel(8), torch.randn(1, 3, 8, 12)
    logits = sliding_logits(model, images, crop=8, stride=2)  # windows at columns 0, 2, 4
    windows = [model(images[:, :, :, c:c + 8]) for c in (0, 2, 4)]
    torch.testing.assert_close(logits[..., 0:2], windows[0][..., 0:2])
    middle = (windows[0][..., 4:6] + windows[1][..., 2:4] + windows[2][..., 0:2]) / 3
    torch.testing.assert_close(logits[..., 4:6], middle)
    torch.testing.assert_close(logits[..., 10:12], windows[2][..., 6:8])


def test_sliding_window_pads_an_image_smaller_than_the_crop():
    model = PixelModel(16)
    assert sliding_logits(model, torch.randn(1, 3, 10, 12), crop=16, stride=8).shape == (1, 4, 10, 12)


def test_flip_averaging_of_a_flip_equivariant_model_changes_nothing():
    model, images = PixelModel(8), torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(predict_logits(model, images, 8, flip=True), predict_logits(model, images, 8))


def test_bad_inference_options_are_errors():
    with pytest.raises(MimkitError, match="stride"):
        sliding_logits(PixelModel(8), torch.randn(1, 3, 8, 8), crop=8, stride=9)
    with pytest.raises(MimkitError, match="mode"):
        predict_logits(PixelModel(8), torch.randn(1, 3, 8, 8), 8, mode="tiles")
