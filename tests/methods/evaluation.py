"""Every evaluation command on a tiny pretraining run of 32 px synthetic images (`synthetic:64`): what each
method's tests run to show its runs feed knn (by layer), linprobe, finetune, predict and segment."""

from PIL import Image

from mimkit.cli import main
from tests.eval.test_segment import QUICK, write_layout


def run_every_evaluation(run, tmp_path) -> None:
    """Each command exits 0 on ``run``; ``predict`` on the fine-tuned run."""
    probe = ["--data", "synthetic:64", "--num-workers", "0"]
    assert main(["knn", str(run), *probe, "--layer", "all", "--out", str(tmp_path / "knn")]) == 0
    assert main(["linprobe", str(run), *probe, "--out", str(tmp_path / "lin"), "--epochs", "1"]) == 0
    assert main(["finetune", str(run), "--data", "synthetic:64", "--out", str(tmp_path / "ft"), "--max-steps",
                 "1", "--batch-size", "8", "--set", "data.num_workers=0"]) == 0
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 40), "gray").save(images / "a.png")
    assert main(["predict", str(tmp_path / "ft"), "--images", str(images), "--out",
                 str(tmp_path / "pred")]) == 0
    scenes = write_layout(tmp_path / "scenes", "generic", train=4, val=2)
    assert main(["segment", str(run), "--data", str(scenes), "--out", str(tmp_path / "seg"), *QUICK]) == 0
