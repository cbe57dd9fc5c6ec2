"""Every method's pictures show what they claim, under a per-channel asymmetric normalization and non-square
source images (`mimkit.viz.run_panels`, as ``mimkit visualize`` calls it).

The fresh planted sets found single pictures wrong where another method's were tested (a token map left
unnormalized). Here one test runs every method's pictures on a run whose mean and std differ in every
channel, of two non-square images picked out of order, and checks each panel against the table below:

=============  =====================================================  ===================  ===============
case           panels, in order (the grid's titles)                   the model's panels   maps
=============  =====================================================  ===================  ===============
mae            original, masked, reconstruction, pasted               reconstruction,      -
                                                                      pasted
simmim         masked input, prediction, pasted, original             prediction, pasted   -
maskfeat       original, masked, HOG, prediction                      prediction           grey (glyphs)
data2vec       original, masked, cosine                               cosine               grey, per patch
maskdistill    original, masked, cosine                               cosine               grey, per patch
cae v2         original, masked, cosine                               cosine               grey, per patch
beit, cae      original, masked, tokens, prediction (dVAE-decoded)    prediction           -
beitv2         original, masked, tokens, prediction                   prediction           colour, per patch
dvae           original, from tokens                                  from tokens          -
vqkd           original, tokens                                       tokens               colour, per patch
=============  =====================================================  ===================  ===============

- the original is each picked image in its row, in the run's normalization (the ViT's evaluation view);
- the masked panel is the original at visible pixels and the mean colour (0) at hidden ones, hidden whole
  patches, the run's share of them (hidden and visible not swapped);
- a pasted panel is the original at visible pixels and the prediction at hidden ones;
- a map de-normalized with the run's mean and std is in [0, 1], grey maps the same in every channel;
- a prediction drawn beside its truth (HOG, token maps) equals it at visible patches;
- the model's panels change with the model's weights, the others (the truth) do not.
"""

import copy
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

from mimkit.data.transforms import eval_view
from mimkit.viz import run_panels
from tests.methods.test_settings_reach import built, dvae_file, located, vqkd_run  # noqa: F401 (fixtures)

MEAN, STD = [0.2, 0.5, 0.7], [0.3, 0.15, 0.25]
PICKS = [2, 0]
SEED = 3

class Case(NamedTuple):
    """A row of the table above: the run, its panels in order, the model's, the maps, a prediction's truth."""
    method: str
    settings: dict
    panels: tuple
    models: set
    grey: frozenset = frozenset()
    colour: frozenset = frozenset()
    compared: tuple | None = None  # (prediction, truth), equal at visible patches


TOKENS = ("original", "masked", "tokens", "prediction")
COSINE = ("original", "masked", "cosine")
CASES = {
    "mae": Case("mae", {"mask_ratio": 0.75}, ("original", "masked", "reconstruction", "pasted"),
                {"reconstruction", "pasted"}),
    "simmim": Case("simmim", {"mask_patch_size": 8, "mask_ratio": 0.6},
                   ("masked input", "prediction", "pasted", "original"), {"prediction", "pasted"}),
    "maskfeat": Case("maskfeat", {"hog_cell": 4, "mask_ratio": 0.3},
                     ("original", "masked", "HOG", "prediction"), {"prediction"}, grey={"HOG", "prediction"},
                     compared=("prediction", "HOG")),
    "data2vec": Case("data2vec", {"top_k": 2, "mask_ratio": 0.3}, COSINE, {"cosine"}, grey={"cosine"}),
    "maskdistill": Case("maskdistill", {"teacher": "MAE", "mask_ratio": 0.3}, COSINE, {"cosine"},
                        grey={"cosine"}),
    "cae v2": Case("cae", {"target": "teacher", "teacher": "MAE", "align_weight": 0.0, "mask_ratio": 0.3},
                   COSINE, {"cosine"}, grey={"cosine"}),
    "beit": Case("beit", {"tokenizer": "DVAE", "mask_ratio": 0.3}, TOKENS, {"prediction"}),
    "cae": Case("cae", {"tokenizer": "DVAE", "mask_ratio": 0.3}, TOKENS, {"prediction"}),
    "beitv2": Case("beitv2", {"tokenizer": "VQKD", "mask_ratio": 0.3}, TOKENS, {"prediction"},
                   colour={"tokens", "prediction"}, compared=("prediction", "tokens")),
    "dvae": Case("dvae", {"hidden": 4, "vocab_size": 32}, ("original", "from tokens"), {"from tokens"}),
    "vqkd": Case("vqkd", {"teacher": "MAE", "vocab_size": 32, "decoder_depth": 1}, ("original", "tokens"),
                 {"tokens"}, colour={"tokens"}),
}


def source() -> list:
    """Three 24 x 40 RGB images whose pixels differ by row, column, channel and image."""
    rows, columns = torch.arange(24)[:, None], torch.arange(40)[None]
    return [(torch.stack([(rows * 5 + columns * 3 + 70 * c + 40 * i) % 256 for c in range(3)]).byte(), i)
            for i in range(3)]


def pixels(panel: torch.Tensor) -> torch.Tensor:
    """A panel with the run's normalization undone, unclamped."""
    return panel * torch.tensor(STD).view(1, -1, 1, 1) + torch.tensor(MEAN).view(1, -1, 1, 1)


def per_patch(panel: torch.Tensor, grid: int) -> torch.Tensor:
    """Whether each patch of a (B, C, H, W) panel on a ``grid`` x ``grid`` patch grid is one value."""
    patches = panel.unflatten(2, (grid, -1)).unflatten(4, (grid, -1))  # B, C, gh, p, gw, p
    return (patches - patches[:, :, :, :1, :, :1]).abs().amax() < 1e-5


def at_size(hidden: torch.Tensor, panel: torch.Tensor) -> torch.Tensor:
    """A (B, H, W) bool pixel mask scaled to a panel's size (nearest), as (B, 1, H', W')."""
    return F.interpolate(hidden[:, None].float(), size=panel.shape[-2:], mode="nearest").bool()


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with every weight moved (a tokenizer or teacher loaded from a file stays)."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return other


@pytest.mark.parametrize("case", list(CASES))
def test_every_methods_pictures_show_what_their_titles_claim(case, dvae_file, mae_run, vqkd_run):  # noqa: F811
    method, settings, names, models, grey, colour, compared = CASES[case]
    _, config, model, *_ = built(method, located(settings, dvae_file, mae_run, vqkd_run),
                                 data={"mean": MEAN, "std": STD})
    model.eval()
    images = source()
    panels = run_panels(model, config, images, PICKS, seed=SEED)
    assert tuple(panels) == names

    original = panels["original"]
    assert all(p.shape[:2] == original.shape[:2] == (len(PICKS), 3) for p in panels.values())
    view = eval_view(original.shape[-1], MEAN, STD, 1.0)
    assert torch.equal(original, torch.stack([view(images[i][0])["image"] for i in PICKS]))

    masked_name = next((n for n in names if n.startswith("masked")), None)
    if masked_name:
        masked = panels[masked_name]
        hidden = (masked == 0).all(1)  # [B, H, W]
        visible = ~hidden[:, None]
        assert torch.equal(masked[visible.expand_as(masked)], original[visible.expand_as(original)])
        grid = config.data.img_size // config.model.patch_size
        assert per_patch(hidden[:, None].float(), grid)
        share = hidden.float().mean().item()
        assert abs(share - config.settings.mask_ratio) < 0.07, f"{share:.2f} hidden"
        if "pasted" in panels:
            prediction = panels["reconstruction" if "reconstruction" in panels else "prediction"]
            assert torch.allclose(panels["pasted"], torch.where(visible, original, prediction), atol=1e-6)
        if compared:
            prediction, truth = panels[compared[0]], panels[compared[1]]
            shown = ~at_size(hidden, truth).expand_as(truth)
            assert torch.allclose(prediction[shown], truth[shown], atol=1e-6)

    for name in grey | colour:
        drawn = pixels(panels[name])
        assert drawn.min() > -1e-5 and drawn.max() < 1 + 1e-5, name
        if name in grey:
            assert torch.allclose(drawn, drawn.mean(1, keepdim=True).expand_as(drawn), atol=1e-5), name
        if name in colour or name == "cosine":
            assert per_patch(drawn, config.data.img_size // config.model.patch_size), name

    again = run_panels(perturbed(model), config, images, PICKS, seed=SEED)
    changed = {name for name in names if not torch.equal(panels[name], again[name])}
    assert changed == models
