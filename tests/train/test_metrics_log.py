"""The run's metrics log: records written, read back, and forgotten past a resumed step; the records
`ProgressLog` writes as a run goes."""

import json
import sys
import types

import pytest
import torch

from mimkit.errors import MimkitError
from mimkit.train import progress
from mimkit.train.distributed import World
from mimkit.train.metrics_log import MetricsLog, read_metrics
from mimkit.train.progress import ProgressLog


def logged(run_dir, steps: int):
    log = MetricsLog(run_dir, enabled=True)
    for step in range(1, steps + 1):
        log.write(step, loss=1.0 / step)
    log.close()
    return run_dir / "metrics.jsonl"


@pytest.mark.parametrize("torn", ['{"step": 4, "lo', "\0" * 37])  # a crash mid-write; a power loss
def test_a_torn_last_line_is_left_out_and_trimmed_on_resume(tmp_path, torn):
    path = logged(tmp_path, 3)
    path.write_text(path.read_text() + torn)
    with pytest.warns(UserWarning, match="last line was cut short"):
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    with pytest.warns(UserWarning, match="last line was cut short"):
        MetricsLog(tmp_path).drop_after(2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_a_damaged_line_before_the_last_is_one_line(tmp_path):
    path = logged(tmp_path, 3)
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], '{"step": 2, "lo', lines[2]]) + "\n")
    with pytest.raises(MimkitError, match="line 2 is not a JSON record"):
        read_metrics(tmp_path)


def test_a_disabled_log_of_another_process_writes_and_trims_nothing(tmp_path):
    path = logged(tmp_path, 3)
    other = MetricsLog(tmp_path, enabled=False)
    other.write(4, loss=0.1)
    other.drop_after(1)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3] and path.exists()
    MetricsLog(tmp_path / "other", enabled=False).write(1, loss=0.1)
    assert not (tmp_path / "other").exists() and read_metrics(tmp_path / "other") == []


class FakeWriter:
    """TensorBoard's ``SummaryWriter``, recording what it is given."""

    opened: list = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        self.opened.append(self)

    def add_scalar(self, key, value, step):
        self.scalars.append((key, value, step))

    def close(self):
        self.closed = True


def test_numbers_also_go_to_tensorboard_when_it_is_installed(tmp_path, monkeypatch):
    """Opened at the first record in ``<run>/tensorboard``; numbers only; closed, and opened again by a later
    record."""
    fake_package = types.SimpleNamespace(SummaryWriter=FakeWriter)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake_package)
    monkeypatch.setattr(FakeWriter, "opened", [])
    log = MetricsLog(tmp_path)
    assert FakeWriter.opened == []
    log.write(3, loss=0.5, epoch=1, note="text")
    log.write(4, loss=0.25)
    [writer] = FakeWriter.opened
    assert writer.log_dir == str(tmp_path / "tensorboard")
    assert writer.scalars == [("loss", 0.5, 3), ("epoch", 1, 3), ("loss", 0.25, 4)]
    log.close()
    assert writer.closed
    log.write(5, loss=0.125)
    assert len(FakeWriter.opened) == 2 and FakeWriter.opened[1].scalars == [("loss", 0.125, 5)]


def test_progress_records_every_log_every_steps_and_the_last_with_the_speed_since_the_previous(tmp_path,
                                                                                               monkeypatch):
    """`ProgressLog`: records at steps 2 and 4 (log_every 2) and at the last, 5; the speed is the images of
    every step since the previous record over its time; an evaluation's record gives its epoch too."""
    clock = iter([0.0, 0.0, 1.0, 2.0, 2.5])  # created, entered, then at each record
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    log = ProgressLog(MetricsLog(tmp_path), World(0, 1, torch.device("cpu")), total_steps=5, start_step=0,
                      log_every=2, images_per_step=8, steps_per_epoch=4, desc="test")
    with log:
        for step in range(1, 6):
            log.step(step, {"loss": torch.tensor(1.0 / step), "lr": 0.1})
        log.evaluation(4, {"score": 0.5})
    records = read_metrics(tmp_path)
    assert [(r["step"], r["epoch"], r["images_per_s"]) for r in records[:3]] == [
        (2, 0.5, 16.0), (4, 1.0, 16.0), (5, 1.25, 16.0)]
    assert records[3] == {"step": 4, "epoch": 1.0, "score": 0.5}
