"""Every seed reaches every random draw it promises: the same seed gives the same draw, another seed another.

A fresh planted set found ``segment --init random`` ignoring ``train.seed``: no test varied the seed on that
path. Here each job is started as the command starts it, in-process, and stopped where training would begin
(`mimkit.runner.train` replaced by `capture`), so each random consumer is read on its own: a consumer left on
a fixed seed is caught even when the others follow the seed. The table (consumer, setting):

=====================================================  ==========================================
consumer                                               setting
=====================================================  ==========================================
initial weights of each method's model                 ``train.seed`` (pretrain, tokenizer train)
data order (`EpochBatches`)                            ``train.seed`` (every training job)
augmentation and masks of each view (per-sample seed)  ``train.seed`` (every training job)
fine-tuning head (and a random encoder)                ``train.seed``
segmentation heads, ``--init random``                  ``train.seed``
fine-tuning / segmentation label subset, val part      ``labels.seed``
linprobe / knn label subset and held-out val part      ``--seed``
linear probe's initialization and data order           ``--seed`` (`train_linear_probe`)
synthetic images (``synthetic:N``)                     the split's seed (`SyntheticSource`)
``visualize``'s images and masks of a pretraining run   ``--seed``
=====================================================  ==========================================
"""

import pytest
import torch

import mimkit.eval.knn as knn
import mimkit.eval.linprobe as linprobe
import mimkit.pretrain as pretrain
import mimkit.runner as runner
from mimkit.cli import main
from mimkit.data.loader import EpochBatches
from mimkit.data.synthetic import SyntheticSource
from mimkit.eval.linprobe import train_linear_probe
from tests.conftest import same_outcomes
from tests.methods.test_settings_reach import dvae_file, vqkd_run  # noqa: F401 (fixtures)

DATA = {"data.img_size": 32, "data.num_workers": 0}
TINY = DATA | {"model.name": "vit_mini", "model.patch_size": 4, "model.kwargs.depth": 1,
               "model.kwargs.embed_dim": 32, "model.kwargs.num_heads": 2}
OWN = {  # each method's settings that keep it tiny, and the tokenizer or teacher it reads
    "mae": {"model.kwargs.decoder_depth": 1, "model.kwargs.decoder_embed_dim": 32,
            "model.kwargs.decoder_num_heads": 2},
    "simmim": {"simmim.mask_patch_size": 16},
    "maskfeat": {},
    "data2vec": {"data2vec.top_k": 1},
    "beit": {"beit.tokenizer": "DVAE"},
    "beitv2": {"beitv2.tokenizer": "VQKD"},
    "cae": {"cae.tokenizer": "DVAE", "model.kwargs.regressor_depth": 1, "model.kwargs.decoder_depth": 1},
    "maskdistill": {"maskdistill.teacher": "MAE"},
}
TOKENIZERS = {"dvae": {"dvae.hidden": 4, "dvae.vocab_size": 32},  # its size is its own settings'
              "vqkd": TINY | {"vqkd.teacher": "MAE", "vqkd.vocab_size": 32, "vqkd.decoder_depth": 1}}
DETERMINISTIC_KEYS = {"label"}  # a view's keys that no seed should change


class Captured(Exception):
    """Raised where training would start, carrying what the job would train with."""

    def __init__(self, model, dataset, options):
        super().__init__("captured")
        self.model, self.dataset, self.options = model, dataset, options


def capture(model, loss_fn, dataset, optimizer, schedule, world, options, **_):
    raise Captured(model, dataset, options)


def started(args: list[str], monkeypatch) -> Captured:
    """The job ``mimkit ARGS`` would train, stopped before its first step."""
    monkeypatch.setattr(runner, "train", capture)
    with pytest.raises(Captured) as caught:
        main(args)
    return caught.value


def draws(job: Captured) -> dict[str, list]:
    """Each random consumer's draw in a started job: the initial weights, the first epoch's order, the
    training subset's positions, and each view key of sample 0 under the first sample's seed."""
    batches = EpochBatches(len(job.dataset), 4, job.options.seed)
    (first, seed), *_ = next(iter(batches))
    source = job.dataset.source
    out = {"init": [t.clone() for t in job.model.state_dict().values()],
           "order": [index for batch in batches for index, _ in batch],
           "subset": list(getattr(source, "indices", range(len(source))))}
    view = job.dataset[(0, seed)]
    out |= {f"view {key}": [value] for key, value in view.items()
            if isinstance(value, torch.Tensor) and key not in DETERMINISTIC_KEYS}
    return out


def sets(values: dict) -> list[str]:
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def located(values: dict, files: dict) -> dict:
    return {key: files.get(value, value) for key, value in values.items()}


@pytest.fixture
def teachers(dvae_file, vqkd_run, mae_run):  # noqa: F811 (fixtures)
    return {"DVAE": str(dvae_file), "VQKD": str(vqkd_run), "MAE": str(mae_run)}


def pretraining_args(kind: str, seed: int, out, files: dict) -> list[str]:
    if kind in TOKENIZERS:
        head, own = ["tokenizer", "train", kind], TOKENIZERS[kind]
    else:
        head, own = ["pretrain", kind], TINY | OWN[kind]
    return [*head, "--data", "synthetic:16", "--out", str(out), "--max-steps", "1", "--batch-size", "4",
            *sets(DATA | located(own, files) | {"train.seed": seed})]


def assert_each_draw_follows(outcome, consumers: set[str], views: bool = False) -> None:
    """``outcome(seed)`` is a job's draws; each consumer's (and with ``views`` each view key's) is the same
    for one seed and differs for two."""
    first, again, other = outcome(3), outcome(3), outcome(4)
    consumers = consumers | ({name for name in first if name.startswith("view ")} if views else set())
    assert consumers <= set(first), f"no draw of {consumers - set(first)}"
    for name in first:
        assert same_outcomes(first[name], again[name]), f"{name}: one seed gave two draws"
    for name in consumers:
        assert not same_outcomes(first[name], other[name]), f"{name}: two seeds gave one draw"


@pytest.mark.parametrize("kind", [*OWN, *TOKENIZERS])
def test_a_pretraining_jobs_weights_order_augmentation_and_masks_follow_train_seed(kind, teachers, tmp_path,
                                                                                   monkeypatch):
    runs = iter(range(3))
    outcome = lambda seed: draws(started(pretraining_args(kind, seed, tmp_path / str(next(runs)), teachers),  # noqa: E731
                                         monkeypatch))
    assert_each_draw_follows(outcome, {"init", "order", "view image"}, views=True)


@pytest.mark.parametrize("init", ["pretrained", "random"])
def test_a_finetuning_jobs_head_order_augmentation_and_labels_follow_their_seeds(init, mae_run, tmp_path,
                                                                                 monkeypatch):
    runs = iter(range(6))

    def job(train_seed: int, labels_seed: int) -> dict:
        return draws(started(["finetune", str(mae_run), "--data", "synthetic:40", "--out",
                              str(tmp_path / str(next(runs))), "--max-steps", "1", "--batch-size", "4",
                              "--init", init, "--label-fraction", "0.5", "--val-fraction", "0.25",
                              *sets({"data.num_workers": 0, "train.seed": train_seed,
                                     "labels.seed": labels_seed})], monkeypatch))

    assert_each_draw_follows(lambda seed: job(seed, 0), {"init", "order", "view image"}, views=True)
    assert_each_draw_follows(lambda seed: job(0, seed), {"subset"})


def segment_job(mae_run, data, out, init: str, train_seed: int, labels_seed: int, monkeypatch) -> dict:
    return draws(started(["segment", str(mae_run), "--data", str(data), "--out", str(out),
                          "--config", "segment_fmnist", "--max-steps", "1", "--batch-size", "2",
                          "--init", init, "--label-fraction", "0.5",
                          *sets({"seg.crop_size": 32, "data.num_workers": 0, "train.seed": train_seed,
                                 "labels.seed": labels_seed})], monkeypatch))


@pytest.mark.parametrize("init", ["pretrained", "random"])
def test_a_segmentation_jobs_heads_crops_and_images_follow_their_seeds(init, mae_run, tmp_path, monkeypatch):
    from tests.eval.test_segment import write_layout
    data = write_layout(tmp_path / "generic", "generic", train=8)
    runs = iter(range(6))
    job = lambda train, labels: segment_job(mae_run, data, tmp_path / str(next(runs)), init, train, labels,  # noqa: E731
                                            monkeypatch)
    assert_each_draw_follows(lambda seed: job(seed, 0), {"init", "order", "view image", "view mask"},
                             views=True)
    assert_each_draw_follows(lambda seed: job(0, seed), {"subset"})


@pytest.mark.parametrize("command, spied", [("linprobe", "train_linear_probe"), ("knn", "knn_accuracy")])
def test_a_probes_label_subset_and_held_out_part_follow_seed(command, spied, mae_run, tmp_path,
                                                             monkeypatch):
    """``--seed`` picks the labelled subset and the held-out validation part (the features each trains on
    and is scored on) and, for the linear probe, reaches `train_linear_probe`."""
    module = {"linprobe": linprobe, "knn": knn}[command]
    seen = []

    def spy(*args, **kwargs):
        seen.append([args[:3], kwargs.get("seed", "no seed")])
        raise Captured(None, None, None)

    monkeypatch.setattr(module, spied, spy)
    runs = iter(range(3))

    def outcome(seed: int) -> dict:
        with pytest.raises(Captured):
            main([command, str(mae_run), "--data", "synthetic:32", "--out", str(tmp_path / str(next(runs))),
                  "--label-fraction", "0.5", "--val-fraction", "0.25", "--seed", str(seed)])
        features, probe_seed = seen[-1]  # (train features, labels, and knn's query features)
        return {"train features": list(features)} | (
            {"probe seed": [probe_seed]} if command == "linprobe" else {})

    assert_each_draw_follows(outcome, {"train features", *(["probe seed"] if command == "linprobe" else [])})


def test_a_linear_probes_init_and_order_follow_its_seed():
    """Each draw on its own: at lr 0 the linear layer keeps its init, and the BatchNorm's running mean (the
    last batches weigh most) shows the order of the batches."""
    features = torch.randn(24, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(24) % 3

    def outcome(seed: int) -> dict:
        probe = train_linear_probe(features, labels, 3, epochs=1, batch_size=8, base_lr=0.0, warmup_epochs=0,
                                   seed=seed)
        return {"init": list(probe[1].state_dict().values()), "order": [probe[0].running_mean]}

    assert_each_draw_follows(outcome, {"init", "order"})


@pytest.mark.parametrize("num_classes", [1, 10])
def test_a_synthetic_sources_images_follow_its_seed(num_classes):
    def outcome(seed: int) -> dict:
        source = SyntheticSource(n=4, image_size=16, num_classes=num_classes, seed=seed)
        return {f"image {i}": [source[i][0]] for i in range(4)}

    assert_each_draw_follows(outcome, {f"image {i}" for i in range(4)})


def test_visualizes_images_and_masks_follow_seed(mae_run, tmp_path, monkeypatch):
    """``visualize --seed`` picks the images shown and seeds their masks (`mimkit.viz.run_panels`)."""
    seen = []

    def spy(model, config, source, picks, seed):
        seen.append({"images": [picks], "masks": [seed]})
        raise Captured(None, None, None)

    monkeypatch.setattr(pretrain, "run_panels", spy)

    def outcome(seed: int) -> dict:
        with pytest.raises(Captured):
            main(["visualize", str(mae_run), "--out", str(tmp_path / "v.png"), "--n", "3", "--seed",
                  str(seed)])
        return seen[-1]

    assert_each_draw_follows(outcome, {"images", "masks"})
