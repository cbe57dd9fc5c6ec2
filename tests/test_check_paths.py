"""Every check that more than one command reaches is tested on each of them.

A fresh planted set found a check tested on one path and bypassed on another. Each test here is one check,
parametrized over every command that takes the value it checks: a bad data path (each command that reads
data, refused in one line before anything is built: ``segment`` once counted a missing folder's images and
fell over with a traceback), a label fraction and a held-out fraction outside their ranges (``finetune``,
``linprobe``, ``knn``, ``segment``).
"""

import pytest

from mimkit.cli import main
from tests.eval.test_segment import write_layout

# command -> its arguments before --data (ENCODER: the pretrained run it reads)
COMMANDS = {
    "pretrain": ["pretrain", "mae"],
    "tokenizer train": ["tokenizer", "train", "dvae"],
    "finetune": ["finetune", "ENCODER"],
    "linprobe": ["linprobe", "ENCODER"],
    "knn": ["knn", "ENCODER"],
    "segment": ["segment", "ENCODER"],
}
BAD_DATA = {"missing": ("missing", "does not exist"), "a file": ("file.png", "not a folder")}
# each command's shortest run, so that a check bypassed ends the test soon with exit 0
SHORT = {"finetune": ["--max-steps", "1", "--batch-size", "4"], "linprobe": ["--epochs", "1"],
         "segment": ["--max-steps", "1", "--batch-size", "2", "--set", "seg.crop_size=32"]}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error:") and "Traceback" not in "\n".join(err), err
    return err[-1]


def command(name: str, encoder, out, *args: str) -> list[str]:
    head = [str(encoder) if arg == "ENCODER" else arg for arg in COMMANDS[name]]
    return [*head, "--out", str(out), *args]


@pytest.mark.parametrize("bad", BAD_DATA)
@pytest.mark.parametrize("name", COMMANDS)
def test_a_bad_data_path_is_refused_in_one_line_by_every_command(name, bad, mae_run, tmp_path, capsys):
    path, message = BAD_DATA[bad]
    (tmp_path / "file.png").write_bytes(b"not an image")
    assert main(command(name, mae_run, tmp_path / "out", "--data", str(tmp_path / path))) == 2
    assert message in one_line_error(capsys)


FRACTIONS = {"--label-fraction": ("the label fraction (--label-fraction) must be", ("0", "1.5", "nan")),
             "--val-fraction": ("the val fraction (--val-fraction) must be", ("1", "-0.1", "nan"))}
TAKEN_BY = {"--label-fraction": ("finetune", "linprobe", "knn", "segment"),
            "--val-fraction": ("finetune", "linprobe", "knn")}  # segment scores its data's own val split
CASES = [(name, flag, value) for flag, names in TAKEN_BY.items() for name in names
         for value in FRACTIONS[flag][1]]


@pytest.mark.parametrize("name, flag, value", CASES)
def test_a_fraction_out_of_range_is_refused_in_one_line_by_every_command(name, flag, value, mae_run, tmp_path,
                                                                         capsys):
    scenes = tmp_path / "scenes"
    data = write_layout(scenes, "generic", train=4, val=2) if name == "segment" else "synthetic:32"
    assert main(command(name, mae_run, tmp_path / "out", "--data", str(data), f"{flag}={value}",
                        *SHORT.get(name, []))) == 2
    assert FRACTIONS[flag][0] in one_line_error(capsys)
