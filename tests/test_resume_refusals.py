"""Every job kind that resumes refuses a trained run's changed settings: each pretraining method, both
tokenizers, fine-tuning and segmentation.

`mimkit.runs.keep_config` compares a trained run's saved configuration with the new one; a method may name
settings of its own that can change (`mimkit.registry.Method.resumable`). Earlier tests showed the refusal on
MAE's pretraining; a job kind that skipped the check, opened its run forced, or a method that listed a
setting changing what a step computes as resumable, would resume a run under settings it was not trained
with. Each kind is started as its command starts it and stopped where training would begin
(`tests.test_seeds.started`); a checkpoint of step 1 is then laid in the run, and the same command with one
of the kind's own settings changed must be refused in one line, naming it (the unchanged command resuming
is tested on MAE's runs, `tests/test_reliability_run.py`).
"""

import pytest

from mimkit.cli import main
from tests.methods.test_settings_reach import dvae_file, vqkd_run  # noqa: F401 (fixtures)
from tests.test_reliability_data import one_line_error
from tests.test_seeds import OWN, TOKENIZERS, pretraining_args, sets, started, teachers  # noqa: F401

CHANGED = {  # kind: one of its own settings that changes what a training step computes, and a new value
    "mae": ("mae.mask_ratio", 0.5), "simmim": ("simmim.mask_ratio", 0.5),
    "maskfeat": ("maskfeat.hog_bins", 6), "data2vec": ("data2vec.loss_beta", 0.0),
    "beit": ("beit.mask_ratio", 0.3), "beitv2": ("beitv2.min_block", 4),
    "cae": ("cae.align_weight", 0.5), "maskdistill": ("maskdistill.smooth_l1_beta", 0.1),
    "dvae": ("dvae.kl_weight", 0.5), "vqkd": ("vqkd.commitment", 0.5),
    "finetune": ("augment.reprob", 0.5), "segment": ("seg.aux_weight", 0.2),
}


def job_args(kind: str, out, files: dict, tmp_path) -> list[str]:
    """The shortest command of job ``kind`` writing to ``out``."""
    if kind in OWN or kind in TOKENIZERS:
        return pretraining_args(kind, 0, out, files)
    if kind == "finetune":
        return ["finetune", files["MAE"], "--data", "synthetic:40", "--out", str(out), "--max-steps", "1",
                "--batch-size", "4", *sets({"data.num_workers": 0})]
    from tests.eval.test_segment import write_layout
    data = tmp_path / "data"
    if not data.is_dir():
        write_layout(data, "generic", train=4, val=2)
    return ["segment", files["MAE"], "--data", str(data), "--out", str(out), "--config", "segment_fmnist",
            "--max-steps", "1", "--batch-size", "2", *sets({"seg.crop_size": 32, "data.num_workers": 0})]


@pytest.mark.parametrize("kind", CHANGED)
def test_every_job_kind_refuses_to_resume_a_trained_run_with_its_own_settings_changed(
        kind, teachers, tmp_path, monkeypatch, capsys):  # noqa: F811 (a fixture)
    out = tmp_path / "run"
    args = job_args(kind, out, teachers, tmp_path)
    started(args, monkeypatch)  # the run's configuration saved, no step trained
    for suffix in ("pt", "safetensors"):  # as if step 1 were trained
        (out / "checkpoints").mkdir(exist_ok=True)
        (out / "checkpoints" / f"step-1.{suffix}").write_bytes(b"")
    setting, value = CHANGED[kind]
    capsys.readouterr()
    assert main([*args, "--set", f"{setting}={value}"]) == 2
    one_line_error(capsys, "trained to step 1 with other settings", setting)
