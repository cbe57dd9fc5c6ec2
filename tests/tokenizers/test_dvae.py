import math

import pytest
import torch
from safetensors.torch import save_file

from mimkit.data.sources import build_source
from mimkit.errors import MimkitError
from mimkit.methods.dvae import find_tokenizer, load_tokenizer, load_tokenizer_encoder
from mimkit.tokenizers.dvae import (
    DVAE,
    ResBlock,
    codebook_stats,
    dvae_for,
    save_dvae,
    saved_dvae_config,
)


@pytest.fixture(scope="module")
def fashion():
    """512 normalized Fashion-MNIST test images, (512, 1, 28, 28)."""
    source = build_source("fashion-mnist", split="test")
    imgs = torch.stack([source[i][0] for i in range(512)]).float() / 255
    return (imgs - source.info.mean[0]) / source.info.std[0]


@pytest.fixture(scope="module")
def trained(fashion):
    """A 64-code dVAE trained for 100 steps, with its metrics before and after."""
    torch.manual_seed(0)
    model = dvae_for(28, 4, 1, vocab_size=64, hidden=8)
    probe = fashion[:256]

    def measure():
        with torch.no_grad():
            _, metrics, _ = model(probe, temperature=1.0, kl_weight=0.0)
        hard = torch.nn.functional.mse_loss(model.decode(model.tokenize(probe)), probe)  # from argmax codes
        return {**metrics, "hard_recon": hard}

    before = measure()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    steps = 100
    for step in range(steps):
        temperature = 0.1 ** (step / steps)  # DALL-E-style exponential annealing, 1 -> 0.1
        loss, _, _ = model(fashion[torch.randint(0, len(fashion), (32,), generator=g)], temperature, 0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, before, measure()


def test_ids_have_the_patch_grid_shape():
    model = dvae_for(28, 4, 1, vocab_size=32, hidden=8)
    ids = model.tokenize(torch.randn(2, 1, 28, 28))
    assert ids.shape == (2, 7, 7) and ids.dtype == torch.long and not ids.requires_grad
    assert 0 <= ids.min() and ids.max() < 32
    assert model.decode(ids).shape == (2, 1, 28, 28)
    # BEiT's second, lower-resolution tokenizer view: 32 px ViT with patch 8 -> 4x4 grid, tokenizer at 16 px
    small = dvae_for(32, 8, 3, vocab_size=16, hidden=8, tokenizer_size=16)
    assert small.tokenize(torch.randn(2, 3, 16, 16)).shape == (2, 4, 4)
    loss, metrics, recon = small(torch.randn(2, 3, 16, 16), temperature=1.0, kl_weight=0.1)
    assert recon.shape == (2, 3, 16, 16) and loss.ndim == 0
    assert set(metrics) == {"recon", "kl", "usage", "perplexity"}


def test_kl_is_zero_for_a_uniform_posterior():
    model = DVAE(in_chans=1, vocab_size=16, hidden=8, num_down=1)
    final = model.encoder.net[-1]
    torch.nn.init.zeros_(final.weight)
    torch.nn.init.zeros_(final.bias)  # logits all 0 -> q = U(16)
    _, metrics, _ = model(torch.randn(2, 1, 8, 8), temperature=1.0, kl_weight=1.0)
    assert metrics["kl"].abs() < 1e-6
    torch.nn.init.constant_(final.bias, 0.0)
    final.bias.data[3] = 100.0  # q = one-hot -> KL = log K
    _, metrics, _ = model(torch.randn(2, 1, 8, 8), temperature=1.0, kl_weight=1.0)
    assert metrics["kl"].item() == pytest.approx(math.log(16), abs=1e-4)


def test_codebook_stats():
    same = codebook_stats(torch.full((4, 7, 7), 5), 64)
    assert same["usage"].item() == pytest.approx(1 / 64) and same["perplexity"].item() == pytest.approx(1.0)
    every = codebook_stats(torch.arange(64).repeat(3), 64)
    assert every["usage"].item() == 1.0 and every["perplexity"].item() == pytest.approx(64.0)
    once = codebook_stats(torch.tensor([0, 1, 1, 2]), 4)  # a code hit once counts as used
    assert once["usage"].item() == 0.75 and once["perplexity"].item() == pytest.approx(2 ** 1.5)


@pytest.mark.slow
def test_training_lowers_loss_and_grows_codebook_usage(trained):
    _, before, after = trained
    assert after["recon"] < 0.3 * before["recon"]  # ~1.0 -> ~0.2
    assert after["hard_recon"] < 0.3 * before["hard_recon"]  # decoding the argmax ids works too
    assert after["usage"] > before["usage"] + 0.2  # ~0.28 -> ~0.7 of the 64 codes
    assert after["perplexity"] > 2 * before["perplexity"]  # ~6 -> ~19


@pytest.mark.slow
def test_save_load_round_trip(trained, fashion, tmp_path):
    model, _, _ = trained
    imgs = fashion[:64]
    written = save_dvae(model, tmp_path / "runs" / "dvae")  # a folder, created
    assert written.name == "dvae.safetensors"
    loaded = load_tokenizer(find_tokenizer(tmp_path / "runs" / "dvae"))
    assert torch.equal(loaded.tokenize(imgs), model.tokenize(imgs))
    assert torch.equal(loaded.decode(model.tokenize(imgs)), model.decode(model.tokenize(imgs)))
    encoder = load_tokenizer_encoder(find_tokenizer(written))
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    assert torch.equal(encoder.tokenize(imgs), model.tokenize(imgs))


@pytest.mark.parametrize("where", ["file", "folder"])
def test_a_saved_dvae_of_non_default_size_loads_whole_and_as_a_frozen_encoder(tmp_path, where):
    """Every constructor argument travels in the file: a model built from the defaults would not take the
    weights of a 3-channel, 2-block, 4-wide, 16-code dVAE."""
    torch.manual_seed(0)
    model = dvae_for(16, 4, 3, vocab_size=16, hidden=4, num_res=2, recon_loss="l1")
    path = tmp_path / "dvae.safetensors" if where == "file" else tmp_path / "runs" / "tok"  # folders made
    written = save_dvae(model, str(path))  # a str as well as a Path
    assert written == (path if where == "file" else path / "dvae.safetensors") and written.is_file()
    imgs = torch.randn(2, 3, 16, 16)
    ids = model.tokenize(imgs)
    loaded = load_tokenizer(find_tokenizer(path))
    assert loaded.config == model.config and loaded.recon_fn is torch.nn.functional.l1_loss
    assert not loaded.training
    assert torch.equal(loaded.tokenize(imgs), ids) and torch.equal(loaded.decode(ids), model.decode(ids))
    encoder = load_tokenizer_encoder(find_tokenizer(written))
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    assert torch.equal(encoder.tokenize(imgs), ids)


def test_hard_codes_decode_as_their_one_hot_relaxation_does():
    """`decode` puts each cell's code vector where the cell is: what the training forward decodes when the
    relaxed sample is one-hot (a transposed grid would decode another image)."""
    torch.manual_seed(0)
    model = DVAE(in_chans=1, vocab_size=8, hidden=4, num_down=1)
    ids = torch.randint(0, 8, (2, 3, 5))  # not square: rows and columns cannot be confused
    one_hot = torch.nn.functional.one_hot(ids, 8).float()  # [B, h, w, K]
    expected = model.decoder(torch.einsum("bhwk,kc->bchw", one_hot, model.codebook.weight))
    torch.testing.assert_close(model.decode(ids), expected)
    assert model.decode(ids).shape == (2, 1, 6, 10)


def test_load_errors(tmp_path):
    with pytest.raises(MimkitError, match="neither a tokenizer run directory"):
        find_tokenizer(tmp_path)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(MimkitError, match="not a dVAE"):
        load_tokenizer_encoder(find_tokenizer(tmp_path / "other.safetensors"))
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04 not a safetensors header")  # unreadable
    with pytest.raises(MimkitError, match="pickle.safetensors' is not a dVAE saved by mimkit"):
        saved_dvae_config(tmp_path / "pickle.safetensors")


@pytest.mark.parametrize("kwargs, needle", [
    (dict(img_size=28, patch_size=5, in_chans=1), "img_size 28 is not a multiple of patch_size 5"),
    (dict(img_size=32, patch_size=8, in_chans=1, tokenizer_size=24),
     r"tokenizer size 24 must be the patch grid side 4 times a power of two \(e.g. 8, 16\)"),
    (dict(img_size=28, patch_size=4, in_chans=1, recon_loss="bce"), "bce"),
])
def test_dvae_for_rejects_bad_arguments(kwargs, needle):
    with pytest.raises(MimkitError, match=needle):
        dvae_for(**kwargs)


def test_the_training_forward_is_the_relaxed_sample_decoded_plus_the_weighted_kl():
    """One forward at a temperature and KL weight away from 1, recomputed from its parts under the same seed:
    the Gumbel-softmax over the codes (dim 1) at that temperature, decoded through the codebook, the L1
    reconstruction, the KL of the code posterior from the uniform prior, and the metrics of the argmax
    codes."""
    torch.manual_seed(0)
    model = DVAE(in_chans=1, vocab_size=8, hidden=4, num_down=1, recon_loss="l1")
    imgs = torch.randn(3, 1, 8, 6)
    torch.manual_seed(1)
    loss, metrics, recon = model(imgs, temperature=0.3, kl_weight=0.25)
    with torch.no_grad():
        logits = model.encoder(imgs)  # (3, 8, 4, 3)
    torch.manual_seed(1)
    soft = torch.nn.functional.gumbel_softmax(logits, tau=0.3, dim=1)
    expected = model.decoder(torch.einsum("bkhw,kc->bchw", soft, model.codebook.weight))
    torch.testing.assert_close(recon, expected)
    rec = (expected - imgs).abs().mean()
    q = logits.softmax(dim=1)
    kl = (q * (q * 8).log()).sum(dim=1).mean()
    torch.testing.assert_close(metrics["recon"], rec)
    torch.testing.assert_close(metrics["kl"], kl)
    torch.testing.assert_close(loss, rec + 0.25 * kl)
    stats = codebook_stats(logits.argmax(1), 8)  # the argmax codes' histogram: not one code per cell
    assert 0 < stats["usage"] < 1 or stats["perplexity"] < 7.5
    assert metrics["usage"] == stats["usage"] and metrics["perplexity"] == stats["perplexity"]


def test_the_default_model_has_one_residual_block_per_stage():
    """The constructors' defaults: one residual block per stage, in the encoder and in the decoder."""
    model = DVAE(in_chans=1, vocab_size=8, hidden=4, num_down=2)
    assert model.config == dict(in_chans=1, vocab_size=8, hidden=4, num_down=2, num_res=1, recon_loss="mse")
    assert sum(isinstance(m, ResBlock) for m in model.encoder.net) == 3
    assert sum(isinstance(m, ResBlock) for m in model.decoder) == 3
    assert model.recon_fn is torch.nn.functional.mse_loss
    assert dvae_for(16, 4, 1, vocab_size=8, hidden=4).config["num_res"] == 1


def test_a_residual_block_adds_its_body_to_its_input():
    torch.manual_seed(0)
    block = ResBlock(3)
    x = torch.randn(2, 3, 5, 4)
    body = block.body(x)
    assert body.abs().mean() > 0.01  # not zero: a subtracted body would show
    torch.testing.assert_close(block(x), x + body)


def test_tokenize_picks_each_cells_most_likely_code():
    """The argmax of the logits over the codes: a code whose bias towers over the others is every cell's
    id, and in general each cell's id is its largest logit."""
    torch.manual_seed(0)
    model = DVAE(in_chans=1, vocab_size=8, hidden=4, num_down=1)
    imgs = torch.randn(2, 1, 8, 6)
    logits = model.encoder(imgs)
    assert torch.equal(model.tokenize(imgs), logits.argmax(1)) and model.tokenize(imgs).shape == (2, 4, 3)
    model.encoder.net[-1].bias.data[5] = 1e4
    assert torch.equal(model.tokenize(imgs), torch.full((2, 4, 3), 5))


@pytest.mark.parametrize("tokenizer_size, num_down", [(4, 0), (8, 1), (16, 2), (32, 3), (None, 3), (64, 4)])
def test_the_tokenizer_size_sets_the_halvings_from_its_view_to_the_grid(tokenizer_size, num_down):
    """A 32-px ViT in 8-px patches has a 4 x 4 grid: a tokenizer view of 4 px needs no halving (the grid
    itself), 8 px one, ... (its own size, unset, 32 px: three)."""
    model = dvae_for(32, 8, 1, vocab_size=8, hidden=2, tokenizer_size=tokenizer_size)
    assert model.config["num_down"] == num_down
    side = tokenizer_size or 32
    assert model.tokenize(torch.randn(1, 1, side, side)).shape == (1, 4, 4)
