"""The EMA of a fine-tuned classifier's weights: it moves by its decay after each optimizer step, and its
accuracy is the one reported under ``*_ema_*``."""

import pytest
import torch

import mimkit.runner
from mimkit.cli import main
from mimkit.eval.finetune import accuracies
from mimkit.models.classifier import FineTuned, build_classifier
from mimkit.models.vit import build_vit


def tiny_classifier(num_classes: int = 3, ema_decay: float | None = 0.9) -> FineTuned:
    torch.manual_seed(0)
    encoder = build_vit(dict(embed_dim=32, depth=2, num_heads=2), img_size=16, patch_size=4, in_chans=1)
    return FineTuned(build_classifier(encoder, num_classes, "avg", 0.0), ema_decay)


def nudge(model: torch.nn.Module, by: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(by)


def test_ema_follows_the_weights_by_its_decay():
    model = tiny_classifier(ema_decay=0.9)
    nudge(model.classifier, 1.0)
    model.update_ema(1)  # timm's ModelEmaV3 starts from the weights after the first step
    for name, value in model.classifier.state_dict().items():
        torch.testing.assert_close(model.ema.module.state_dict()[name], value, msg=name)
    first = {k: v.clone() for k, v in model.ema.module.state_dict().items()}
    nudge(model.classifier, 1.0)
    model.update_ema(2)
    for name, value in model.classifier.state_dict().items():
        if value.is_floating_point():
            expected = 0.9 * first[name] + 0.1 * value
            torch.testing.assert_close(model.ema.module.state_dict()[name], expected, msg=name)
    assert not any(p.requires_grad for p in model.ema.parameters())  # the optimizer never sees it


def test_accuracies_report_the_ema_beside_the_weights():
    """A classifier that answers class 0 and an EMA that answers class 1, on images of class 1."""
    model = tiny_classifier(num_classes=2)
    with torch.no_grad():
        model.classifier.head.bias.copy_(torch.tensor([10.0, 0.0]))
        model.ema.module.head.bias.copy_(torch.tensor([0.0, 10.0]))
    batches = [{"image": torch.randn(4, 1, 16, 16), "label": torch.ones(4, dtype=torch.long)}]
    results = accuracies(model, batches, torch.device("cpu"), "val")
    assert results["val_top1"] == 0 and results["val_ema_top1"] == 100
    assert "val_ema_top1" not in accuracies(tiny_classifier(2, ema_decay=None), batches, torch.device("cpu"),
                                            "val")


@pytest.mark.parametrize("ema_decay, kept", [("0.9", "val_ema_top1"), ("null", "val_top1")])
def test_a_run_keeps_the_best_weights_by_the_accuracy_it_reports_last(ema_decay, kept, mae_run, tmp_path,
                                                                       monkeypatch):
    """A run with an EMA keeps the weights whose EMA scored best (the EMA is what it reports and exports);
    one without, by the weights' own accuracy. The loop is replaced: only what it is asked to keep is read."""
    asked = []

    def loop(*args, evaluation, **kwargs):
        asked.append(evaluation.keep_best)
        return {"step": 0, "interrupted": True, "resumed_from": None}

    monkeypatch.setattr(mimkit.runner, "train", loop)
    main(["finetune", str(mae_run), "--data", "synthetic", "--batch-size", "8", "--set", "data.num_workers=0",
          "--set", f"ema_decay={ema_decay}", "--out", str(tmp_path / "ft")])
    assert asked == [kept]
