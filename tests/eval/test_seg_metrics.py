"""Segmentation scores on hand-computed confusion matrices, the ignore index, and sliding-window inference."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mimkit.errors import MimkitError
from mimkit.eval.seg_metrics import (
    confusion_matrix,
    evaluate_segmentation,
    format_table,
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


def test_scores_of_predictions_count_only_labelled_pixels():
    """From pixels to scores: three ignored pixels (predicted as class d, the one absent from the truth)
    are left out of every number, and d, absent from both, has no IoU and no Acc."""
    target = torch.tensor([[0, 0, 1, 1, 255], [2, 2, 1, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1, 3], [2, 0, 1, 3, 3]])
    matrix = confusion_matrix(pred, target, 4)
    assert matrix.tolist() == [[1, 1, 0, 0], [0, 3, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    scores = segmentation_scores(matrix, ["a", "b", "c", "d"])
    assert scores["aAcc"] == pytest.approx(100 * 5 / 7)  # 7 labelled pixels, not 10
    # IoU: a 1/(2+2-1), b 3/(3+4-3), c 1/(2+1-1); Acc: a 1/2, b 3/3, c 1/2
    assert scores["mIoU"] == pytest.approx(100 * (1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert scores["mAcc"] == pytest.approx(100 * (1 / 2 + 1 + 1 / 2) / 3)
    assert scores["per_class"] == [{"class": "a", "IoU": 33.33, "Acc": 50.0},
                                   {"class": "b", "IoU": 75.0, "Acc": 100.0},
                                   {"class": "c", "IoU": 50.0, "Acc": 50.0},
                                   {"class": "d", "IoU": None, "Acc": None}]
    # another ignore index: 255 is then a label past the classes
    assert confusion_matrix(pred, target.where(target != 255, 7), 4, ignore_index=7).equal(matrix)
    with pytest.raises(MimkitError, match="label 255"):
        confusion_matrix(pred, target, 4, ignore_index=7)


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


class WindowPosition(nn.Module):
    """Logits that say where a pixel sits in the window the model sees: [column in the window, row in the
    window, the image's first channel, 1]."""

    def __init__(self, crop: int):
        super().__init__()
        self.crop = crop

    def forward(self, x):
        assert x.shape[2:] == (self.crop, self.crop)
        b, _, h, w = x.shape
        column = torch.arange(w, dtype=x.dtype).expand(b, h, w)
        row = torch.arange(h, dtype=x.dtype)[:, None].expand(b, h, w)
        return torch.stack([column, row, x[:, 0], torch.ones_like(column)], dim=1)


def test_sliding_window_is_the_mean_over_every_window_that_covers_a_pixel():
    """10x12 image, 8x8 windows every 2 px: tops 0, 2 and lefts 0, 2, 4 (6 windows). Column c lies in the
    windows at lefts L <= c < L + 8, and its averaged position is the mean of c - L over them."""
    images = torch.randn(1, 3, 10, 12)
    logits = sliding_logits(WindowPosition(8), images, crop=8, stride=2)
    assert logits.shape == (1, 4, 10, 12)
    # c = 0, 1: window 0 -> c; 2, 3: windows 0, 2 -> c - 1; 4..7: 0, 2, 4 -> c - 2; 8, 9: 2, 4 -> c - 3;
    # 10, 11: window 4 -> c - 4
    columns = [0, 1, 1, 2, 2, 3, 4, 5, 5, 6, 6, 7]
    rows = [0, 1, 1, 2, 3, 4, 5, 6, 6, 7]  # r = 0, 1: top 0; 2..7: tops 0, 2 -> r - 1; 8, 9: top 2 -> r - 2
    assert logits[0, 0].tolist() == [[float(c) for c in columns]] * 10
    assert logits[0, 1].tolist() == [[float(r)] * 12 for r in rows]
    torch.testing.assert_close(logits[0, 2], images[0, 0])  # each window's logits land where it was cut
    assert (logits[0, 3] == 1).all()  # a mean, not a sum over the 1, 2, 3 or 6 windows


def test_the_last_window_is_flush_with_the_border():
    """Width 11, 8-px windows every 2 px: lefts 0, 2 and 3 (not 4, which would reach past the image and be
    padded). Column c's mean position over the windows that cover it, by hand."""
    logits = sliding_logits(WindowPosition(8), torch.randn(1, 3, 8, 11), crop=8, stride=2)
    # c = 0, 1: window 0; c = 2: windows 0, 2; c = 3..7: 0, 2, 3 -> c - 5/3; c = 8, 9: 2, 3 -> c - 2.5;
    # c = 10: window 3 -> 7
    expected = [0, 1, 1, 4 / 3, 7 / 3, 10 / 3, 13 / 3, 16 / 3, 5.5, 6.5, 7]
    assert logits[0, 0, 0].tolist() == pytest.approx(expected)
    assert (logits[0, 3] == 1).all()


class Recorder(nn.Module):
    """Logits [first channel, 1]; keeps every input it is given."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x)
        return torch.stack([x[:, 0], torch.ones_like(x[:, 0])], dim=1)


@pytest.mark.parametrize("size, ratio, scaled", [((5, 7), 0.75, (4, 5)), ((3, 3), 0.5, (2, 2)),
                                                 ((2, 9), 0.1, (1, 1))])
def test_a_scale_of_the_multi_scale_test_rounds_each_side_to_the_nearest_pixel(size, ratio, scaled):
    """The image the model sees at ``ratio`` (here in one padded window) has its sides rounded, at least 1."""
    model = Recorder()
    logits = predict_logits(model, torch.ones(1, 1, *size), crop=8, mode="slide", stride=8, scales=(ratio,))
    seen = model.inputs[0][0, 0] != 0
    assert (int(seen.any(1).sum()), int(seen.any(0).sum())) == scaled and logits.shape[2:] == size


def test_whole_image_inference_resizes_bilinearly_to_the_crop_and_back():
    """A 16x16 image and an 8-px model: the model sees the bilinear half-size image (each 2x2 block's mean),
    and its logits come back at 16x16."""
    images = torch.randn(2, 3, 16, 16)
    model = Recorder()
    logits = whole_logits(model, images, 8)
    assert len(model.inputs) == 1
    torch.testing.assert_close(model.inputs[0], F.avg_pool2d(images, 2))
    assert logits.shape == (2, 2, 16, 16) and (logits[:, 1] == 1).all()
    # back up bilinearly (pixel centres): row 0 is the small row 0, row 1 is 3/4 of it and 1/4 of small row 1
    small = F.avg_pool2d(images, 2)[:, 0]
    torch.testing.assert_close(logits[:, 0, 0, 0], small[:, 0, 0])
    row = 0.75 * small[:, 0, 0] + 0.25 * small[:, 1, 0]
    torch.testing.assert_close(logits[:, 0, 1, 0], row)


def test_sliding_window_pads_a_short_side_and_cuts_the_padding_away():
    images = torch.randn(1, 3, 6, 12)  # 6 rows: one row of windows, padded to 8 below
    logits = sliding_logits(WindowPosition(8), images, crop=8, stride=4)  # lefts 0, 4
    assert logits[0, 1].tolist() == [[float(r)] * 12 for r in range(6)]
    assert logits[0, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 2.0, 3.0, 4.0, 5.0, 4.0, 5.0, 6.0, 7.0]
    torch.testing.assert_close(logits[0, 2], images[0, 0])


def test_sliding_window_pads_an_image_smaller_than_the_crop():
    model = PixelModel(16)
    assert sliding_logits(model, torch.randn(1, 3, 10, 12), crop=16, stride=8).shape == (1, 4, 10, 12)


def test_flip_averaging_of_a_flip_equivariant_model_changes_nothing():
    model, images = PixelModel(8), torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(predict_logits(model, images, 8, flip=True), predict_logits(model, images, 8))


class ColumnModel(nn.Module):
    """Not flip-equivariant: logits [x, column, x * column] for the image's first channel x."""

    def forward(self, x):
        column = torch.arange(x.shape[-1], dtype=x.dtype).expand_as(x[:, 0])
        return torch.stack([x[:, 0], column, x[:, 0] * column], dim=1)


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_flip_averaging_unflips_the_logits_of_the_flipped_image(mode):
    """The flipped image's logits, flipped back, are averaged with the image's: at column c of a width-8
    image the column logit is (c + 7 - c) / 2 = 3.5, and x * column becomes x * 3.5."""
    images = torch.randn(2, 3, 8, 8)
    x = images[:, 0]
    plain = predict_logits(ColumnModel(), images, 8, mode=mode)
    column = torch.arange(8.0).expand_as(x)
    torch.testing.assert_close(plain, torch.stack([x, column, x * column], 1))
    flipped = predict_logits(ColumnModel(), images, 8, mode=mode, flip=True)
    torch.testing.assert_close(flipped, torch.stack([x, torch.full_like(x, 3.5), x * 3.5], 1))


@pytest.mark.parametrize("stride", [9, 0])
def test_bad_inference_options_are_errors(stride):
    with pytest.raises(MimkitError, match="stride"):
        sliding_logits(PixelModel(8), torch.randn(1, 3, 8, 8), crop=8, stride=stride)
    with pytest.raises(MimkitError, match="mode"):
        predict_logits(PixelModel(8), torch.randn(1, 3, 8, 8), 8, mode="tiles")


def test_a_stride_of_one_pixel_is_a_window_at_every_offset():
    images = torch.randn(1, 3, 8, 10)
    model = Recorder()
    torch.testing.assert_close(sliding_logits(model, images, crop=8, stride=1)[:, 0], images[:, 0])
    assert len(model.inputs) == 3  # lefts 0, 1, 2


@pytest.mark.parametrize("mode, windows", [("whole", [(16, 16)]), ("slide", [(16, 16)] * 4)])
def test_the_mode_decides_whole_image_or_windows(mode, windows):
    """A 32-px image and a 16-px crop: ``whole`` resizes the image to the crop once, ``slide`` (stride: the
    crop) gives the model its four quarters."""
    model = Recorder()
    predict_logits(model, torch.randn(1, 3, 32, 32), 16, mode=mode)
    assert [tuple(x.shape[-2:]) for x in model.inputs] == windows


def test_scores_of_classes_of_a_single_pixel():
    """A class of one labelled pixel, predicted right, and one of one pixel predicted as the other: the
    divisions by one pixel are not rounded up."""
    matrix = torch.tensor([[1, 0], [1, 0]])
    scores = segmentation_scores(matrix)
    assert scores["per_class"] == [{"class": "class_0", "IoU": 50.0, "Acc": 100.0},
                                   {"class": "class_1", "IoU": 0.0, "Acc": 0.0}]
    alone = segmentation_scores(torch.tensor([[1, 0], [0, 0]]))
    assert alone["aAcc"] == 100.0
    assert alone["per_class"][0] == {"class": "class_0", "IoU": 100.0, "Acc": 100.0}


def test_the_table_aligns_each_class_row_under_its_columns():
    scores = segmentation_scores(torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]]),
                                 ["background", "cat", "x"])
    assert format_table(scores).splitlines() == [
        "class         IoU    Acc",
        "background  75.00  75.00",
        "cat         66.67  100.00",
        "x               -      -",
        "aAcc 83.33  mIoU 70.83  mAcc 87.50",
    ]


class RampClasses(nn.Module):
    """A 1x1 convolution: class 1 where the first channel is positive, else 0; keeps its outputs' dtypes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, 0, 0, 0] = torch.tensor([-1.0, 1.0])
        self.dtypes = []

    def forward(self, x):
        logits = self.conv(x)
        self.dtypes.append(logits.dtype)
        return logits


def test_evaluation_scores_at_the_masks_size_in_full_precision_and_leaves_eval_mode():
    """8-px images whose first channel rises by 1 a column from -0.8, scored against 16-px masks: the logits
    are upsampled bilinearly (pixel centres: mask column j reads image column j / 2 - 1/4) to the masks, so
    class 1 starts at mask column 3 (corner-aligned upsampling would start it at 2); float32 on the CPU."""
    images = (torch.arange(8.0) - 0.8).expand(2, 3, 8, 8).contiguous()
    masks = torch.zeros(2, 16, 16, dtype=torch.long)
    masks[..., 3:] = 1
    model = RampClasses().train()
    scores = evaluate_segmentation(model, [{"image": images, "mask": masks}], torch.device("cpu"), 2, crop=8)
    assert scores["confusion"] == [[96, 0], [0, 416]] and scores["aAcc"] == 100.0
    assert all(type(count) is int for row in scores["confusion"] for count in row)  # exact past 2**24 pixels
    assert not model.training and model.dtypes == [torch.float32]
