"""Every command's printed summary states the numbers of its results, each under its own name.

Each job's ``results.json`` is the dict it returns (tested with each job); the command prints its summary from
that dict. Here each job is replaced by one returning results whose every number differs, and the printed
lines must show each number where its name is, rounded as printed:

==================  ======================================  ==================================================
command             job replaced                            lines
==================  ======================================  ==================================================
finetune            `mimkit.eval.finetune.run_finetune`     test top-1
linprobe --layer 1  `mimkit.eval.linprobe.run_linprobe`     test top-1 at block 1
knn --layer all     `mimkit.eval.knn.run_knn`               each block's test top-1, the best block's, plot
segment             `mimkit.eval.segment.run_segment`       mIoU, aAcc, mAcc
evaluate            `mimkit.eval.seg_evaluate.evaluate_run` each class's IoU and Acc, aAcc, mIoU, mAcc
tokenizer train     `mimkit.pretrain.run_pretraining`       the held-out usage and perplexity, the step
==================  ======================================  ==================================================
"""

import pytest

from mimkit.cli import main

PROBE_ROWS = [{"layer": 1, "test_top1": 61.125, "val_top1": 19.5},
              {"layer": 2, "test_top1": 72.5, "val_top1": 8.0}]
CASES = {
    "finetune": ("mimkit.eval.finetune.run_finetune", ["finetune", "RUN", "--data", "synthetic:16"],
                 {"test_top1": 11.111, "test_top5": 22.222, "val_top1": 33.333, "test_best_top1": 44.444},
                 ["run directory: OUT  test top-1 11.11%"]),
    "linprobe": ("mimkit.eval.linprobe.run_linprobe",
                 ["linprobe", "RUN", "--data", "synthetic:16", "--layer", "1"],
                 {"test_top1": 44.444, "test_top5": 55.555, "val_top1": 66.666},
                 ["linprobe: test top-1 44.44% at block 1  (results: OUT/results.json)"]),
    "knn": ("mimkit.eval.knn.run_knn", ["knn", "RUN", "--data", "synthetic:16", "--layer", "all"],
            {"test_top1": 72.5, "test_top5": 93.75, "val_top1": 8.0, "by_layer": PROBE_ROWS,
             "plot": "by_depth.png"},
            ["  block  1: test top-1 61.12%", "  block  2: test top-1 72.50%",
             "knn: test top-1 72.50%  (results: OUT/results.json, plot: OUT/by_depth.png)"]),
    "segment": ("mimkit.eval.segment.run_segment", ["segment", "RUN", "--data", "synthetic:16"],
                {"mIoU": 41.2341, "aAcc": 82.3459, "mAcc": 53.4561, "fwIoU": 64.567},
                ["run directory: OUT  mIoU 41.23  aAcc 82.35  mAcc 53.46"]),
    "evaluate": ("mimkit.eval.seg_evaluate.evaluate_run", ["evaluate", "RUN"],
                 {"data": "scenes", "mIoU": 41.2341, "aAcc": 82.3459, "mAcc": 53.4561,
                  "per_class": [{"class": "sky", "IoU": 12.5, "Acc": None},
                                {"class": "road", "IoU": 87.25, "Acc": 90.0}]},
                 ["class    IoU    Acc", "sky    12.50      -", "road   87.25  90.00",
                  "aAcc 82.35  mIoU 41.23  mAcc 53.46",
                  "val of scenes: mIoU 41.23  (results: OUT/results.json"]),
    "tokenizer train": ("mimkit.pretrain.run_pretraining",
                        ["tokenizer", "train", "vqkd", "--teacher", "RUN", "--data", "synthetic:16"],
                        {"interrupted": False, "step": 7, "usage": 0.875, "perplexity": 28.5,
                         "val_usage": 0.53125, "val_perplexity": 17.25},
                        ["held-out images: usage 0.5312, perplexity 17.25", "run directory: OUT  (step 7; "]),
}


@pytest.mark.parametrize("command", list(CASES))
def test_every_commands_summary_prints_its_results_numbers_under_their_names(command, mae_run, tmp_path,
                                                                             monkeypatch, capsys):
    job, argv, results, lines = CASES[command]
    monkeypatch.setattr(job, lambda *args, **kwargs: results)
    out = tmp_path / "out"
    argv = [str(mae_run) if a == "RUN" else a for a in argv]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for line in lines:
        assert line.replace("OUT", str(out)) in printed, printed
