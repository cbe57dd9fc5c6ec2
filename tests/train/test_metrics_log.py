"""The run's metrics log: records written, read back, and forgotten past a resumed step."""

import json

import pytest

from mimkit.errors import MimkitError
from mimkit.train.metrics_log import MetricsLog, read_metrics


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
