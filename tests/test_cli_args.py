"""What each command passes on: its flags parsed into the configuration and arguments of the function that
does the work, which is replaced here by a recorder (the commands themselves run in the slow tests), and
what the command prints and returns from that function's answer."""

import argparse
import dataclasses
import logging
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch.distributed as dist

from mimkit import cli
from mimkit.config import load_recipe
from mimkit.data.shards import DEFAULT_PACK_QUALITY
from mimkit.errors import Interrupted, MimkitError
from mimkit.runs import load_config


class Calls(list):
    """Replace ``module.name`` by a function that records its arguments and answers ``answer``."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.monkeypatch = monkeypatch

    def record(self, module: str, name: str, answer=None):
        def recorded(*args, **kwargs):
            self.append(SimpleNamespace(name=name, args=args, kwargs=kwargs))
            if isinstance(answer, BaseException):
                raise answer
            return answer

        self.monkeypatch.setattr(f"{module}.{name}", recorded)

    @property
    def only(self) -> SimpleNamespace:
        assert len(self) == 1, [c.name for c in self]
        return self[0]


@pytest.fixture
def calls(monkeypatch):
    return Calls(monkeypatch)


SUMMARY = {"interrupted": False, "step": 7}


def test_pretrain_passes_its_flags_into_the_configuration_and_the_run(calls, tmp_path, capsys):
    calls.record("mimkit.pretrain", "run_pretraining", SUMMARY)
    out = tmp_path / "run"
    assert cli.main(["pretrain", "mae", "--data", "synthetic:8", "--out", str(out), "--model", "vit_mini",
                     "--epochs", "3", "--batch-size", "4", "--skip-bad-images",
                     "--set", "optim.base_lr=0.002",
                     "--rescan", "--auto-size", "--force-config"]) == 0
    config, run_dir = calls.only.args
    assert run_dir == out and config.method == "mae"
    assert (config.data.source, config.model.name) == ("synthetic:8", "vit_mini")
    assert config.data.skip_bad_images is True
    assert (config.train.epochs, config.train.max_steps, config.train.batch_size) == (3, None, 4)
    assert config.optim.base_lr == 0.002
    kwargs = calls.only.kwargs
    assert (kwargs["rescan"], kwargs["auto_size"], kwargs["force_config"]) == (True, True, True)
    assert kwargs["recipe"].startswith("mae_fmnist: ")
    kwargs["report"](["line one", "line two"])
    printed = capsys.readouterr().out
    assert "line one\nline two\n" in printed and f"run directory: {out}  (step 7;" in printed


def test_pretrain_trains_the_method_it_names_whatever_recipe_it_reads(calls, tmp_path):
    """A recipe written for another method (``--config mae_fmnist``) gives its settings, not its method."""
    calls.record("mimkit.pretrain", "run_pretraining", SUMMARY)
    assert cli.main(["pretrain", "simmim", "--config", "mae_fmnist", "--data", "synthetic:8",
                     "--out", str(tmp_path / "run")]) == 0
    config = calls.only.args[0]
    assert config.method == "simmim" and config.train.epochs == load_recipe("mae_fmnist")["train"]["epochs"]


def test_pretrain_without_flags_keeps_the_recipes_settings(calls, tmp_path):
    calls.record("mimkit.pretrain", "run_pretraining", SUMMARY)
    assert cli.main(["pretrain", "mae", "--out", str(tmp_path / "run"), "--max-steps", "5"]) == 0
    config, _ = calls.only.args
    assert config.data.source == "fashion-mnist" and config.data.skip_bad_images is False
    assert config.train.max_steps == 5 and config.train.epochs > 0  # the recipe's epochs, capped by the steps
    kwargs = calls.only.kwargs
    assert (kwargs["rescan"], kwargs["auto_size"], kwargs["force_config"]) == (False, False, False)


@pytest.mark.parametrize("method, flag, section_key", [("beit", "--tokenizer", "tokenizer"),
                                                        ("maskdistill", "--teacher", "teacher")])
def test_pretrain_gives_the_tokenizer_and_teacher_to_its_method(calls, tmp_path, method, flag, section_key):
    calls.record("mimkit.pretrain", "run_pretraining", SUMMARY)
    assert cli.main(["pretrain", method, "--data", "synthetic:8", "--out", str(tmp_path / "run"),
                     flag, "somewhere"]) == 0
    assert getattr(calls.only.args[0].settings, section_key) == "somewhere"


def test_pretrain_gives_both_the_tokenizer_and_the_teacher_to_its_method(calls, tmp_path, capsys):
    """--teacher beside --tokenizer keeps both: CAE v2 then refuses the tokenizer it takes no use of, rather
    than the flag vanishing."""
    calls.record("mimkit.pretrain", "run_pretraining", SUMMARY)
    assert cli.main(["pretrain", "cae", "--config", "caev2_fmnist", "--out", str(tmp_path / "run"),
                     "--teacher", "somewhere", "--tokenizer", "elsewhere"]) == 2
    assert "takes no tokenizer: drop --tokenizer" in capsys.readouterr().err and calls == []


def test_pretrain_reports_held_out_scores_the_tokenizers_user_and_an_interruption(calls, tmp_path, capsys):
    calls.record("mimkit.pretrain", "run_pretraining", {**SUMMARY, "val_usage": 0.53125, "loss": 1.0})
    out = tmp_path / "tok"
    assert cli.main(["tokenizer", "train", "dvae", "--data", "synthetic:8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "held-out images: usage 0.5312\n" in printed
    assert f"use it: mimkit pretrain beit --tokenizer {out}" in printed
    calls.record("mimkit.pretrain", "run_pretraining", {**SUMMARY, "interrupted": True})
    assert cli.main(["pretrain", "mae", "--data", "synthetic:8", "--out", str(tmp_path / "mae")]) == 130
    calls.record("mimkit.pretrain", "run_pretraining", SUMMARY)
    assert cli.main(["pretrain", "mae", "--data", "synthetic:8", "--out", str(tmp_path / "mae")]) == 0
    printed = capsys.readouterr().out
    assert "held-out" not in printed and "use it" not in printed


def test_the_end_of_a_command_maps_to_its_exit_status(calls, tmp_path, capsys):
    args = ["export", "run", "--to", "timm", "--out", str(tmp_path / "x")]
    for raised, status in ((MimkitError("no such run"), 2), (KeyboardInterrupt(), 130), (Interrupted(), 130)):
        calls.record("mimkit.interop.export", "export_run", raised)
        assert cli.main(args) == status
    assert capsys.readouterr().err == "error: no such run\ninterrupted\n"


def test_export_and_import_pass_their_flags(calls, tmp_path, capsys):
    calls.record("mimkit.interop.export", "export_run", [Path("a.bin"), Path("b.json")])
    assert cli.main(["export", "r", "--to", "hf", "--out", "o", "--encoder-only", "--force"]) == 0
    assert calls.only.args == ("r", "hf", "o") and calls.only.kwargs == {"encoder_only": True, "force": True}
    assert "wrote a.bin, b.json" in capsys.readouterr().out
    calls.clear()
    report = SimpleNamespace(summary=lambda: ["loaded 12 tensors"], notes=["a note"], run_dir=tmp_path)
    calls.record("mimkit.interop.importer", "import_checkpoint", report)
    assert cli.main(["import", "ck.pth", "--format", "mae", "--out", "o", "--img-size", "32",
                     "--allow-mismatch", "--set", "model.kwargs.num_heads=2", "--force"]) == 0
    assert calls.only.args == ("ck.pth", "mae", "o")
    assert calls.only.kwargs == {"img_size": 32, "allow_mismatch": True,
                                 "overrides": {"model": {"kwargs": {"num_heads": 2}}}, "force": True}
    printed = capsys.readouterr().out
    assert "loaded 12 tensors\n  a note\n" in printed and f"run directory: {tmp_path}" in printed


def fake_run(monkeypatch, **kind_fields) -> SimpleNamespace:
    """Every path reads as a run of a kind with ``kind_fields`` (and no encoder spec), its directory the path
    itself and its weights file ``weights``; the config records the directories it was read from."""
    kind = SimpleNamespace(name="fake", spec=None, visualize=None, predict=None, picture="fake.png")
    kind.__dict__.update(kind_fields)
    config = SimpleNamespace(read_from=[])
    monkeypatch.setattr("mimkit.runs.split_weights_path", lambda path: (Path(path), Path("weights")))
    monkeypatch.setattr("mimkit.runs.read_run",
                        lambda run_dir: config.read_from.append(run_dir) or (kind, config))
    return config


def test_visualize_passes_the_picture_path_count_and_seed(calls, monkeypatch, tmp_path, capsys):
    config = fake_run(monkeypatch, visualize=lambda *args: calls.append(args) or [Path("p.png")])
    assert cli.main(["visualize", "r", "--out", str(tmp_path), "--n", "3", "--seed", "5"]) == 0
    assert calls.only == (config, Path("r"), tmp_path / "fake.png", 3, 5)
    printed = capsys.readouterr().out
    assert "is a folder: the picture is named fake.png\n" in printed and "wrote p.png" in printed
    assert cli.main(["visualize", "r", "--out", str(tmp_path), "--n", "0"]) == 2
    fake_run(monkeypatch)
    assert cli.main(["visualize", "r", "--out", str(tmp_path / "a.png")]) == 2
    assert "draws nothing of it" in capsys.readouterr().err


def test_predict_passes_its_flags_and_refuses_a_run_that_predicts_nothing(calls, monkeypatch, capsys):
    config = fake_run(monkeypatch, predict=lambda *args: calls.append(args) or "wrote 3 maps")
    assert cli.main(["predict", "r", "--images", "im", "--out", "o", "--tta", "flip", "--batch-size", "2",
                     "--force"]) == 0
    assert calls.only == (config, Path("r"), "im", "o", "flip", 2, True) and config.read_from == [Path("r")]
    assert "wrote 3 maps" in capsys.readouterr().out
    assert cli.main(["predict", "r", "--images", "im", "--out", "o", "--batch-size", "0"]) == 2
    fake_run(monkeypatch)
    assert cli.main(["predict", "r", "--images", "im", "--out", "o"]) == 2
    assert "predict needs a segmentation run" in capsys.readouterr().err


def test_evaluate_passes_its_flags(calls, monkeypatch, capsys):
    calls.record("mimkit.eval.seg_evaluate", "evaluate_run", {"data": "d", "mIoU": 41.5})
    monkeypatch.setattr("mimkit.eval.seg_metrics.format_table", lambda results: "the table")
    assert cli.main(["evaluate", "r", "--out", "o", "--split", "train", "--data", "d", "--tta", "ms",
                     "--batch-size", "3"]) == 0
    assert calls.only.args == ("r", "o", "train", "d", "ms", 3)
    assert "the table\ntrain of d: mIoU 41.50" in capsys.readouterr().out
    assert cli.main(["evaluate", "r", "--out", "o", "--batch-size", "0"]) == 2


def test_finetune_passes_its_flags_into_the_configuration(calls, tmp_path, capsys):
    calls.record("mimkit.eval.finetune", "run_finetune", {"test_top1": 81.25})
    assert cli.main(["finetune", "enc", "--data", "synthetic:8", "--out", str(tmp_path), "--label-fraction",
                     "0.5", "--val-fraction", "0.2", "--init", "random", "--pool", "cls", "--max-steps", "4",
                     "--batch-size", "2", "--set", "optim.layer_decay=0.5", "--force-config"]) == 0
    config, run_dir, force_config = calls.only.args
    assert (run_dir, force_config) == (tmp_path, True)
    assert (config.encoder, config.data.source) == ("enc", "synthetic:8")
    assert (config.labels.fraction, config.labels.val_fraction) == (0.5, 0.2)
    assert (config.classifier.init, config.classifier.pool) == ("random", "cls")
    assert (config.train.max_steps, config.train.batch_size, config.optim.layer_decay) == (4, 2, 0.5)
    assert "test top-1 81.25%" in capsys.readouterr().out
    calls.record("mimkit.eval.finetune", "run_finetune", {"interrupted": True})
    assert cli.main(["finetune", "enc", "--data", "synthetic:8", "--out", str(tmp_path)]) == 130


def test_finetune_flags_of_zero_override_the_recipe(calls, tmp_path):
    """--val-fraction 0 (use the data's own validation) is a value given, not a flag left out."""
    calls.record("mimkit.eval.finetune", "run_finetune", {})
    recipe = tmp_path / "held_out.yaml"
    recipe.write_text("labels: {val_fraction: 0.2}\n")
    args = ["finetune", "enc", "--data", "synthetic:8", "--out", str(tmp_path / "run"),
            "--config", str(recipe)]
    assert cli.main(args) == 0 and cli.main([*args, "--val-fraction", "0"]) == 0
    assert [call.args[0].labels.val_fraction for call in calls] == [0.2, 0.0]


def test_segment_passes_its_flags_into_the_configuration(calls, monkeypatch, tmp_path, capsys):
    encoder = fake_run(monkeypatch)
    calls.record("mimkit.eval.segment", "run_segment", {"mIoU": 50.0, "aAcc": 90.0, "mAcc": 60.0})
    assert cli.main(["segment", "enc", "--data", "fmnist-scenes", "--out", str(tmp_path), "--head", "linear",
                     "--init", "random", "--label-fraction", "0.5", "--epochs", "2", "--batch-size", "3",
                     "--set", "seg.crop_size=64", "--auto-size", "--force-config"]) == 0
    config, run_dir, force_config = calls.only.args
    assert (run_dir, force_config) == (tmp_path, True)
    assert (config.encoder, config.data.source) == ("enc", "fmnist-scenes")
    assert (config.seg.head, config.seg.init, config.labels.fraction) == ("linear", "random", 0.5)
    assert (config.train.epochs, config.train.batch_size, config.seg.crop_size) == (2, 3, 64)
    assert calls.only.kwargs == {"recipe": "segment_fmnist: the recipe of fmnist-scenes", "auto_size": True}
    assert encoder.read_from == [Path("enc")]
    assert "mIoU 50.00  aAcc 90.00  mAcc 60.00" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["linprobe", "knn"])
def test_probes_pass_their_flags(calls, monkeypatch, tmp_path, capsys, command):
    calls.record("mimkit.runs", "load_encoder", "the encoder")
    calls.record(f"mimkit.eval.{command}", f"run_{command}", {"test_top1": 12.5, "by_layer": [
        {"layer": 1, "test_top1": 10.0}], "plot": "depth.png"})
    own = {"linprobe": ["--epochs", "3", "--batch-size", "16", "--lr", "0.5", "--optimizer", "lars"],
           "knn": ["--k", "5", "--temperature", "0.5"]}[command]
    assert cli.main([command, "enc", "--data", "synthetic:8", "--out", str(tmp_path), "--init", "random",
                     "--pool", "avg", "--label-fraction", "0.5", "--val-fraction", "0.25", "--seed", "3",
                     "--features-cache", "cache", "--num-workers", "0", "--layer", "2", "--force", *own]) == 0
    load, run = calls
    assert load.args == ("enc", "random", 3)
    encoder, config, out, force = run.args
    assert (encoder, out, force) == ("the encoder", str(tmp_path), True)
    assert (config.encoder, config.init, config.data, config.pool) == ("enc", "random", "synthetic:8", "avg")
    assert (config.label_fraction, config.val_fraction, config.seed) == (0.5, 0.25, 3)
    assert (config.cache_dir, config.num_workers, config.layer) == ("cache", 0, 2)
    if command == "linprobe":
        assert (config.epochs, config.batch_size, config.base_lr, config.optimizer) == (3, 16, 0.5, "lars")
    else:
        assert (config.k, config.temperature) == (5, 0.5)
    printed = capsys.readouterr().out
    assert "  block  1: test top-1 10.00%\n" in printed
    assert f"{command}: test top-1 12.50% at block 2  (results: " in printed and "plot: " in printed


def test_probe_defaults(calls, tmp_path):
    calls.record("mimkit.runs", "load_encoder", "the encoder")
    calls.record("mimkit.eval.knn", "run_knn", {"test_top1": 1.0})
    assert cli.main(["knn", "enc", "--data", "synthetic:8", "--out", str(tmp_path)]) == 0
    config = calls[1].args[1]
    assert (config.init, config.pool) == ("pretrained", "cls")
    assert (config.label_fraction, config.val_fraction) == (1.0, 0.0)
    assert (config.seed, config.layer, calls[1].args[3]) == (0, None, False)


@pytest.mark.parametrize("command", ["linprobe", "knn"])
def test_each_probe_flags_default_is_its_settings_default(command):
    """Every setting of the probe a command builds, no flag given, is the default its settings class (and
    the README) documents, e.g. knn's k=20 and T=0.07 (DINO's), linprobe's 100 epochs at lr 0.1: only the
    run and data named, and the command's extra loader process, differ."""
    args = cli.build_parser().parse_args([command, "enc", "--data", "synthetic:8", "--out", "o"])
    config = cli.probe_config(args)
    differing = {"encoder": "enc", "data": "synthetic:8", "num_workers": 1}
    for setting in dataclasses.fields(config):
        assert getattr(config, setting.name) == differing.get(setting.name, setting.default), setting.name
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    if command == "knn":
        assert f"cosine k-NN, k={args.k}, T={args.temperature} (DINO)" in readme


def every_option(parser: argparse.ArgumentParser, command: str = "mimkit"):
    """``(command, argparse action)`` of every option of ``parser`` and of each of its sub-commands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from every_option(sub, f"{command} {name}")
        elif action.option_strings:
            yield command, action


# options whose default is filled in after parsing (None means "not given"): the value they then take
FILLED_IN_DEFAULTS = {"--quality": DEFAULT_PACK_QUALITY}


def test_each_default_an_options_help_names_is_the_one_it_takes():
    """A help text's "(default X)" is the option's argparse default, or, for an option that must tell "not
    given" apart (``--quality`` is refused without ``--max-side``), the value it is filled in with: a
    changed default (``data pack --shard-size``, ``evaluate --split``) is caught without a test per option."""
    named = [(command, action, found.group(1)) for command, action in every_option(cli.build_parser())
             if (found := re.search(r"\(default ([\w.]+)\)", action.help or ""))]
    assert {"--shard-size", "--quality", "--split", "--batch-size", "--n", "--seed"} <= {
        action.option_strings[0] for _, action, _ in named}
    for command, action, value in named:
        option = action.option_strings[0]
        default = action.default if action.default is not None else FILLED_IN_DEFAULTS[option]
        assert str(default) == value, f"{command} {option}"


def test_segment_takes_the_recipes_part_for_the_encoders_method_before_set(calls, monkeypatch, tmp_path):
    fake_run(monkeypatch, spec=lambda saved: SimpleNamespace(method="mae"))
    calls.record("mimkit.eval.segment", "run_segment", {})
    args = ["segment", "enc", "--data", "fmnist-scenes", "--out", str(tmp_path), "--config", "segment_ade20k"]
    assert cli.main([*args, "--set", "seg.drop_path=0.2"]) == 0
    config = calls.only.args[0]
    assert (config.optim.base_lr, config.seg.rel_pos_bias, config.seg.drop_path) == (1.6e-3, True, 0.2)
    assert calls.only.kwargs["recipe"] == "segment_ade20k: --config"


def test_epochs_replace_a_recipes_step_count(calls, monkeypatch, tmp_path):
    """``--epochs`` sets a run's length even where its recipe counts it in steps (segment_ade20k's 160,000):
    the steps are dropped, not kept as a cap that would end the run first."""
    fake_run(monkeypatch, spec=lambda saved: SimpleNamespace(method="mae"))
    calls.record("mimkit.eval.segment", "run_segment", {})
    args = ["segment", "enc", "--data", "fmnist-scenes", "--out", str(tmp_path), "--config", "segment_ade20k"]
    assert cli.main(args) == 0 and cli.main([*args, "--epochs", "2"]) == 0
    recipe, flagged = (call.args[0].train for call in calls)
    assert recipe.max_steps == 160_000 and (flagged.epochs, flagged.max_steps) == (2, None)


@pytest.mark.parametrize("count, recipe", [(9_999, "segment_small"), (10_000, "segment_ade20k")])
def test_a_segmentation_folder_gets_the_recipe_of_its_size(monkeypatch, tmp_path, count, recipe):
    monkeypatch.setattr("mimkit.data.sources.count_images", lambda data, stop_after: count)
    assert cli.choose_segment_recipe(str(tmp_path))[0] == recipe
    assert cli.choose_segment_recipe("fmnist-scenes")[0] == "segment_fmnist"


@pytest.mark.parametrize("method, count, recipe", [("mae", 99_999, "mae_small"), ("mae", 100_000, "mae_in1k"),
                                                   ("beit", 10, "beit_in1k")])
def test_a_pretraining_folder_gets_the_recipe_of_its_size(monkeypatch, tmp_path, method, count, recipe):
    monkeypatch.setattr("mimkit.data.sources.count_images", lambda data, stop_after: count)
    assert cli.default_recipe(method, str(tmp_path)) == recipe
    monkeypatch.setenv("HOME", str(tmp_path.parent))
    assert cli.default_recipe(method, f"~/{tmp_path.name}") == recipe  # a folder under the home directory
    assert cli.default_recipe(method, "synthetic:8") == f"{method}_fmnist"
    assert cli.default_recipe(method, str(tmp_path / "not-a-folder")) == f"{method}_in1k"


def test_layer_takes_a_block_number_or_all(calls, tmp_path, capsys):
    calls.record("mimkit.runs", "load_encoder", "the encoder")
    calls.record("mimkit.eval.knn", "run_knn", {"test_top1": 1.0})
    assert cli.main(["knn", "enc", "--data", "synthetic:8", "--out", str(tmp_path), "--layer", "all"]) == 0
    assert calls[1].args[1].layer == "all"
    assert "knn: test top-1 1.00%  (results: " in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["knn", "enc", "--data", "synthetic:8", "--out", str(tmp_path), "--layer", "last"])
    assert "'last' is neither a block number nor 'all'" in capsys.readouterr().err


def test_library_messages_reach_the_user_once(capsys):
    cli.show_library_messages()
    cli.show_library_messages()
    logging.getLogger("mimkit.somewhere").info("a library message")
    assert capsys.readouterr().out == "a library message\n"


def test_a_command_leaves_the_process_group_it_joined(calls, tmp_path):
    calls.record("mimkit.interop.export", "export_run", [])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert cli.main(["export", "r", "--to", "timm", "--out", "o"]) == 0
    assert not dist.is_initialized()


def test_pretrain_resumes_a_run_directory_with_its_own_configuration_unless_a_config_is_given(
        calls, mae_run, tmp_path):
    """Without ``--config``, a run directory that holds a configuration is its own recipe (its tiny model, not
    the recipe's); flags and ``--set`` still apply on top, ``--set`` last."""
    calls.record("mimkit.pretrain", "run_pretraining", SUMMARY)
    run = tmp_path / "mae"
    shutil.copytree(mae_run, run)
    assert cli.main(["pretrain", "mae", "--out", str(run), "--batch-size", "4",
                     "--set", "train.batch_size=8"]) == 0
    config = calls.only.args[0]
    assert config.model == load_config(mae_run).model and config.train.batch_size == 8
    assert calls.only.kwargs["recipe"] == f"{run / 'config.yaml'} (the run's own, resumed)"
    calls.clear()
    assert cli.main(["pretrain", "mae", "--out", str(run), "--config", "mae_fmnist"]) == 0
    assert calls.only.args[0].model.kwargs == load_recipe("mae_fmnist")["model"].get("kwargs", {})


def test_pretrain_refuses_another_methods_run_in_out_and_a_resume_without_checkpoint(calls, mae_run, tmp_path,
                                                                                       capsys):
    calls.record("mimkit.pretrain", "run_pretraining", SUMMARY)
    run = tmp_path / "mae"
    shutil.copytree(mae_run, run)
    assert cli.main(["pretrain", "simmim", "--out", str(run), "--config", "simmim_fmnist"]) == 2
    refusal = f"'{run}' holds a mae vit_mini run; choose another --out for simmim vit_mini"
    assert refusal in capsys.readouterr().err
    assert cli.main(["pretrain", "mae", "--out", str(tmp_path / "new"), "--resume"]) == 2
    assert "--resume: " in capsys.readouterr().err and calls == []
    assert cli.main(["pretrain", "mae", "--out", str(run), "--resume"]) == 0
