"""`benchmarks/segment_small_budget.py`: minutes of pretraining become whole epochs that end within them, at
the timing run's speed or at one given for a shared machine."""

import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import segment_small_budget as bench  # noqa: E402


def test_minutes_become_whole_epochs_at_the_timing_runs_speed(tmp_path):
    timing = tmp_path / "timing-pretrain"
    timing.mkdir()
    (timing / "config.yaml").write_text(yaml.safe_dump({"train": {"batch_size": 128}}))
    (timing / "data.json").write_text(json.dumps({"train_images": 5000}))
    speeds = [40.0, 150.0, 160.0, 170.0]  # the first window (start-up) is left out of the median
    (timing / "metrics.jsonl").write_text("".join(json.dumps({"step": 10 * (i + 1), "images_per_s": s}) + "\n"
                                                  for i, s in enumerate(speeds)))

    budget = bench.pretraining_budget(tmp_path, minutes=45, speed=None)
    # 45 min x 160 images/s = 432,000 images; an epoch is 39 full batches of 128 (4,992 images)
    assert (budget["images_per_s"], budget["epochs"], budget["steps"]) == (160.0, 86, 86 * 39)
    assert budget["warmup_epochs"] == 4 and budget["measured"] == "median of timing-pretrain"
    assert budget["epochs"] * 39 * 128 <= 45 * 60 * 160  # the schedule ends within the budget

    given = bench.pretraining_budget(tmp_path, minutes=45, speed=80.0)
    assert (given["epochs"], given["warmup_epochs"]) == (43, 2) and given["measured"].startswith("given")
    assert bench.pretraining_budget(tmp_path, minutes=0.1, speed=80.0)["epochs"] == 1  # at least one
