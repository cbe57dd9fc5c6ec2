"""`benchmarks/gpu_check.sh --dry-run`: the prepared GPU check runs end to end on CPU at tiny shapes, so it
cannot rot between the sessions that are lent a GPU."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=ROOT,
                            env=os.environ | {"OUT": str(tmp_path), "PYTHON": sys.executable,
                                              "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=1200)
    out = result.stdout
    assert result.returncode == 0, out[-4000:] + result.stderr[-2000:]
    assert "resuming from step 4" in out and (tmp_path / "recon.png").is_file()
    for mode in ("eager", r"torch\.compile \(eager\)"):
        assert re.search(rf"MFU against [\d.]+ TFLOP/s .*AdamW, {mode}\n", out), mode
    for name in ("mimkit", "transformers"):  # eager and compiled, then both again in the closing summary
        rows = re.findall(rf"{name}: ([\d.]+) img/s, ([\d.e+-]+) GFLOP/img \(forward \+ backward\), "
                          r"MFU ([\d.]+)%", out)
        assert len(rows) == 4 and all(float(r[0]) > 0 and float(r[1]) > 0 for r in rows), name
