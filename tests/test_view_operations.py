"""Every view does every operation it promises, as the job that uses it builds it.

Fresh planted sets found single views losing one operation (SimMIM's flip) while the same operation was
tested on another view. Here every view is taken from its job, started as its command starts it with the
run's settings on the command line (`tests.test_seeds.started`): the eight pretraining methods' views (CAE
with a tokenizer and with a teacher, CAE v2), the two tokenizers', fine-tuning's training view (its
``augment`` settings) and its evaluation view, the probes' view and segmentation's training and evaluation
views. Each is checked, per image it returns, for the operations in the table below; the flip is checked in
`tests/methods/test_settings_reach.py`.

=========================  ===================================================================================
operation                  what the test shows it (the run normalizes with a per-channel asymmetric mean/std)
=========================  ===================================================================================
normalization              a uniform image comes out as its colour normalized by the run's mean and std; a
                           second image (BEiT v2's tokenizer input) by its tokenizer run's, a teacher's input
                           and a dVAE's without its own by the run's
keys and dtypes            each view's sample has exactly its keys, dtypes and shapes
crop area and aspect       a crop setting of (0.2, 0.4) gives crops of that area (read off an image whose
                           channels are its x and y coordinates) and aspects spread over (3/4, 4/3)
interpolation              a resize of sharp edges overshoots (bicubic) or stays within them (bilinear:
                           SimMIM's and segmentation's), never only the two input values (nearest)
=========================  ===================================================================================
"""

import pytest
import torch

import mimkit.eval.features as features
import mimkit.eval.finetune as finetune
import mimkit.eval.segment as segment
from mimkit.methods.vqkd import load_vqkd_tokenizer
from mimkit.runs import load_encoder
from tests.methods.test_settings_reach import dvae_file, vqkd_run  # noqa: F401 (fixtures)
from tests.test_seeds import Captured, started

MEAN, STD = [0.1, 0.5, 0.8], [0.2, 0.3, 0.6]  # asymmetric per channel: a swapped or shared one shows
NORM = {"data.mean": MEAN, "data.std": STD}
CROP = (0.2, 0.4)  # a crop area none of the views takes by default
TINY = {"data.img_size": 32, "data.num_workers": 0, "model.name": "vit_mini", "model.patch_size": 4,
        "model.kwargs.depth": 1, "model.kwargs.embed_dim": 32, "model.kwargs.num_heads": 2}
MASKED = {"crop_scale": list(CROP), "color_jitter": 0.0}
PRETRAINING = {  # job: (command, settings), each method's crop and jitter settings set where it has them
    "mae": (["pretrain", "mae"], TINY | {"model.kwargs.decoder_depth": 1, "model.kwargs.decoder_num_heads": 2,
                                         "model.kwargs.decoder_embed_dim": 32}),
    "simmim": (["pretrain", "simmim"], TINY | {"simmim.mask_patch_size": 16,
                                               "simmim.crop_scale": list(CROP)}),
    "maskfeat": (["pretrain", "maskfeat"], TINY | {"maskfeat.crop_scale": list(CROP)}),
    "data2vec": (["pretrain", "data2vec"], TINY | {"data2vec.top_k": 1}
                 | {f"data2vec.{k}": v for k, v in MASKED.items()}),
    "beit": (["pretrain", "beit"], TINY | {"beit.tokenizer": "DVAE"}
             | {f"beit.{k}": v for k, v in MASKED.items()}),
    "beitv2": (["pretrain", "beitv2"], TINY | {"beitv2.tokenizer": "VQKD"}
               | {f"beitv2.{k}": v for k, v in MASKED.items()}),
    "cae": (["pretrain", "cae"], TINY | {"cae.tokenizer": "DVAE", "model.kwargs.regressor_depth": 1,
                                         "model.kwargs.decoder_depth": 1}
            | {f"cae.{k}": v for k, v in MASKED.items()}),
    "caev2": (["pretrain", "cae", "--config", "caev2_fmnist"], TINY | {"cae.teacher": "MAE",
                                                                       "model.kwargs.regressor_depth": 1}
              | {f"cae.{k}": v for k, v in MASKED.items()}),
    "maskdistill": (["pretrain", "maskdistill"], TINY | {"maskdistill.teacher": "MAE"}
                    | {f"maskdistill.{k}": v for k, v in MASKED.items()}),
    "dvae": (["tokenizer", "train", "dvae"], {"data.img_size": 32, "data.num_workers": 0, "dvae.hidden": 4,
                                               "dvae.vocab_size": 32, "dvae.crop_scale": list(CROP)}),
    "vqkd": (["tokenizer", "train", "vqkd"], TINY | {"vqkd.teacher": "MAE", "vqkd.vocab_size": 32,
                                                     "vqkd.decoder_depth": 1, "vqkd.crop_scale": list(CROP)}),
}
FINETUNE = {"data.num_workers": 0, "augment.crop_scale": list(CROP), "augment.auto_augment": None,
            "augment.reprob": 0.0}
SEGMENT = {"data.num_workers": 0, "seg.crop_size": 32, "seg.photometric": False, "seg.eval_scale": [56, 56]}

F32, BOOL, I64 = torch.float32, torch.bool, torch.int64
IMAGE = (F32, (3, 32, 32))
# view: (job, the sample's keys with their dtype and shape, the crop area range or None, interpolation,
# each image key's normalization: "run" (the run's MEAN/STD), "vqkd" (its tokenizer run's), "encoder" (the
# pretraining run's))
VIEWS = {
    "mae": ("mae", {"image": IMAGE, "noise": (F32, (64,))}, (0.2, 1.0), "bicubic", {"image": "run"}),
    "simmim": ("simmim", {"image": IMAGE, "mask": (BOOL, (64,))}, CROP, "bilinear", {"image": "run"}),
    "maskfeat": ("maskfeat", {"image": IMAGE, "mask": (BOOL, (64,))}, CROP, "bicubic", {"image": "run"}),
    "data2vec": ("data2vec", {"image": IMAGE, "mask": (BOOL, (64,))}, CROP, "bicubic", {"image": "run"}),
    **{method: (method, {"image": IMAGE, "tokenizer_image": IMAGE, "mask": (BOOL, (64,))}, CROP, "bicubic",
                {"image": "run", "tokenizer_image": "vqkd" if method == "beitv2" else "run"})
       for method in ("beit", "beitv2", "cae", "caev2", "maskdistill")},
    "dvae": ("dvae", {"image": IMAGE}, CROP, "bicubic", {"image": "run"}),
    "vqkd": ("vqkd", {"image": IMAGE}, CROP, "bicubic", {"image": "run"}),
    "finetune train": ("finetune", {"image": IMAGE}, CROP, "bicubic", {"image": "run"}),
    "finetune eval": ("finetune", {"image": IMAGE}, None, "bicubic", {"image": "run"}),
    "probe eval": ("linprobe", {"image": IMAGE}, None, "bicubic", {"image": "encoder"}),
    "segment train": ("segment", {"image": IMAGE, "mask": (I64, (32, 32))}, None, "bilinear",
                      {"image": "run"}),
    "segment eval": ("segment", {"image": (F32, (3, 56, 56)), "mask": (I64, (40, 40))}, None, "bilinear",
                     {"image": "run"}),
}


def sets(values: dict) -> list[str]:
    return [arg for key, value in values.items()
            for arg in ("--set", f"{key}={'null' if value is None else value}")]


def job_views(job: str, files: dict, out, monkeypatch) -> dict:
    """The views of ``job`` started as its command starts it with the run's MEAN and STD: the training view
    (``job``, or ``"<job> train"``) and the evaluation view each evaluation loader is given."""
    seen = {}

    def loader_spy(source, view, *args, **kwargs):
        seen[f"{job} eval"] = view
        raise Captured(None, None, None) if job == "linprobe" else AssertionError("not reached")

    if job in PRETRAINING:
        head, settings = PRETRAINING[job]
        settings = {key: files.get(value, value) if isinstance(value, str) else value
                    for key, value in settings.items()}
        args = [*head, "--data", "synthetic:16", "--max-steps", "1", "--batch-size", "4",
                *sets(settings | NORM)]
        return {job: started([*args, "--out", str(out)], monkeypatch).dataset.view}
    if job == "linprobe":
        monkeypatch.setattr(features, "cached_features", lambda model, source, view, *a, **k: loader_spy(
            source, view))
        with pytest.raises(Captured):
            from mimkit.cli import main
            main(["linprobe", files["MAE"], "--data", "synthetic:16", "--out", str(out)])
        return {"probe eval": seen["linprobe eval"]}
    module = {"finetune": finetune, "segment": segment}[job]
    monkeypatch.setattr(module, "eval_loader", lambda source, view, *a, **k: seen.setdefault(
        f"{job} eval", view))
    if job == "finetune":
        args = ["finetune", files["MAE"], "--data", "synthetic:40", "--max-steps", "1", "--batch-size", "4",
                *sets(FINETUNE | NORM)]
    else:
        from tests.eval.test_segment import write_layout
        data = write_layout(out / "data", "generic", train=4, val=2)
        args = ["segment", files["MAE"], "--data", str(data), "--config", "segment_fmnist", "--max-steps",
                "1", "--batch-size", "2", *sets(SEGMENT | NORM)]
    return {f"{job} train": started([*args, "--out", str(out / "run")], monkeypatch).dataset.view} | seen


@pytest.fixture(scope="module")
def views(dvae_file, vqkd_run, mae_run, tmp_path_factory):  # noqa: F811 (fixtures)
    """Every view of the table, from its job."""
    files = {"DVAE": str(dvae_file), "VQKD": str(vqkd_run), "MAE": str(mae_run)}
    found = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        for job in dict.fromkeys(job for job, *_ in VIEWS.values()):
            found |= job_views(job, files, tmp_path_factory.mktemp(job), monkeypatch)
    norms = {"run": (MEAN, STD), "encoder": tuple(getattr(load_encoder(mae_run).spec.data, k)
                                                  for k in ("mean", "std")),
             "vqkd": tuple(getattr(load_vqkd_tokenizer(vqkd_run)[1].data, k) for k in ("mean", "std"))}
    return found, norms


def sample(view, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """One sample of ``view`` (a segmentation view is given a mask of class 1 beside the image)."""
    if "Seg" in type(view).__name__:
        return view(image, torch.ones(image.shape[-2:], dtype=torch.uint8))
    return view(image)


def colours(name: str, views, image: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """Each image of ``view``'s sample of ``image`` under ``seed``, de-normalized by the norm the table
    gives it, in 0-255; segmentation's padding (mask 255) left out."""
    found, norms = views
    torch.manual_seed(seed)
    out = sample(found[name], image)
    pictures = {}
    for key, norm in VIEWS[name][4].items():
        mean, std = (torch.tensor(v).view(-1, 1, 1) for v in norms[norm])
        picture = (out[key] * std + mean) * 255
        if "mask" in out and out["mask"].shape == picture.shape[-2:]:
            picture = picture[:, out["mask"] != 255]
        pictures[key] = picture
    return pictures


@pytest.mark.parametrize("name", VIEWS)
def test_every_views_sample_has_its_keys_dtypes_and_shapes(name, views):
    out = sample(views[0][name], torch.full((3, 40, 40), 128, dtype=torch.uint8))
    assert {key: (value.dtype, tuple(value.shape)) for key, value in out.items()} == VIEWS[name][1]


@pytest.mark.parametrize("name", VIEWS)
def test_every_view_normalizes_each_image_by_its_own_mean_and_std(name, views):
    """A uniform image of three different channel values comes out, de-normalized by the table's norm,
    as those values in every image of the sample."""
    rgb = torch.tensor([40, 128, 220], dtype=torch.uint8)
    for key, picture in colours(name, views, rgb.view(3, 1, 1).expand(3, 40, 40).contiguous(), 0).items():
        expected = rgb.float().view(3, *[1] * (picture.dim() - 1)).expand_as(picture)
        torch.testing.assert_close(picture, expected, atol=0.6, rtol=0, msg=f"{key} of {name}")


def coordinates(side: int) -> torch.Tensor:
    """uint8 (3, side, side): channel 0 grows from left to right, 1 from top to bottom, 2 is constant."""
    ramp = torch.linspace(0, 255, side).round().to(torch.uint8)
    return torch.stack([ramp.expand(side, side), ramp[:, None].expand(side, side),
                        torch.full((side, side), 128, dtype=torch.uint8)])


@pytest.mark.parametrize("name", [name for name, case in VIEWS.items() if case[2]])
def test_every_crop_view_takes_crops_of_its_area_and_aspect_range(name, views):
    """On an image whose channels are its x and y coordinates, a crop's width and height (as fractions of
    the image's) are the spans of those channels: over 40 crops their product lies in the crop setting's
    range and spreads over it, and their ratio lies in (3/4, 4/3), some wider and some taller."""
    low, high = VIEWS[name][2]
    areas, aspects = [], []
    for seed in range(40):
        picture = colours(name, views, coordinates(96), seed)["image"]
        width, height = ((channel.amax() - channel.amin()).item() / 255 for channel in picture[:2])
        areas.append(width * height)
        aspects.append(width / height)
    spread = f"crop areas {min(areas):.2f}-{max(areas):.2f}"
    assert low * 0.75 <= min(areas) and max(areas) <= high * 1.1, spread
    assert max(areas) - min(areas) > (high - low) / 3, spread
    assert 0.7 <= min(aspects) < 0.95 and 1.05 < max(aspects) <= 1.45, \
        f"crop aspects {min(aspects):.2f}-{max(aspects):.2f}"


@pytest.mark.parametrize("name", VIEWS)
def test_every_view_resizes_with_its_papers_interpolation(name, views):
    """An image of 3-px squares of two values (60, 190), resized: bicubic overshoots the two somewhere,
    bilinear never does, and both give values between them (nearest gives only the two)."""
    squares = ((torch.arange(40) // 3)[:, None] + (torch.arange(40) // 3)) % 2
    image = (60 + 130 * squares).to(torch.uint8).expand(3, 40, 40).contiguous()
    for key in VIEWS[name][4]:
        values = torch.cat([colours(name, views, image, seed)[key].flatten() for seed in range(6)])
        assert ((values > 70) & (values < 180)).any(), f"{key} of {name}: only the input's values"
        overshoots = bool(((values < 57) | (values > 193)).any())
        assert overshoots == (VIEWS[name][3] == "bicubic"), f"{key} of {name}: not {VIEWS[name][3]}"
