"""Each method against its authors' code, in the suite: the outputs the authors' own code computed on tiny
models, stored in ``tests/fixtures/authors/NAME.safetensors`` by the parity scripts that run outside the
repository (``tests/README.md``, one section per method; ``tests/fixtures/authors/README.md`` lists them).

A fixture holds the inputs, mimkit's weights (the state dict a run of the imported checkpoint loads), the
resolved run configuration (JSON metadata) and the authors' results: the loss at each SGD step, then either
the first step's gradients of every parameter or, where the script compares weights after the steps (CAE v2;
data2vec, whose step also moves the EMA teacher; VQ-KD, whose training forward moves the codebook), every
parameter and the state the authors' code also gives after them; and part of the predictions and
targets where forward returns them. The model is rebuilt through the method registry (`read_config`, the
method's `build_model`), as `load_run` rebuilds a run, and trained the same steps (the method's
`after_step` included); everything is compared within `BOUND`.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mimkit.registry import method_of, read_config

FIXTURES = Path(__file__).parent.parent / "fixtures" / "authors"
BOUND = 1e-5  # the scripts' bound (float32, CPU, tiny models); the largest difference here: 4.1e-6
# the methods checked against their authors' code outside the suite (tests/README.md), a second setting
# where one has two
FIXTURE_NAMES = ("simmim", "maskfeat", "cae", "cae_projected", "caev2", "caev2_projected", "data2vec",
                 "maskdistill", "maskdistill_cosine", "beitv2", "vqkd")


def read_fixture(name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(FIXTURES / f"{name}.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def part(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def assert_close(what: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)}, theirs {tuple(theirs.shape)}"
    diff = (ours.detach().float() - theirs.float()).abs().max().item()
    assert diff <= BOUND, f"{what}: max |mimkit - authors| = {diff:.2e} > {BOUND:g}"


def leading(output: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The corner of ``output`` a fixture stored (the first rows of each dimension)."""
    return output[tuple(slice(0, n) for n in like.shape)]


def test_every_stored_fixture_is_checked():
    assert sorted(p.stem for p in FIXTURES.glob("*.safetensors")) == sorted(FIXTURE_NAMES)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_mimkit_computes_the_authors_outputs(name):
    tensors, meta = read_fixture(name)
    config = read_config(json.loads(meta["config"]))
    method = method_of(config.method)
    model = method.build_model(config)
    weights = part("weight.", tensors)
    for k, p in model.named_parameters():  # a fixed table the model builds (CAE's positions) is the authors'
        if not p.requires_grad and not k.startswith("teacher."):  # (not data2vec's EMA teacher: trained)
            assert_close(f"{k} as built", p, weights[k])
    model.load_state_dict(weights, strict=True)
    model.train(json.loads(meta["train_mode"]))  # VQ-KD's step: its codebook moves in the training forward
    inputs = [tensors[f"input.{k}"] for k in json.loads(meta["inputs"])]
    per_step = json.loads(meta["per_step_inputs"])  # each input holds one batch per step (CAE v2's two)
    kwargs, outputs = json.loads(meta["kwargs"]), json.loads(meta["outputs"])
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(params.values(), lr=float(meta["lr"]))
    for step, their_loss in enumerate(tensors["loss"]):
        output = model(*(x[step] if per_step else x for x in inputs), **kwargs)
        assert_close(f"loss at step {step}", output[0], their_loss)
        optimizer.zero_grad()
        output[0].backward()
        if step == 0:
            for what, theirs in part("output.", tensors).items():
                assert_close(what, leading(output[outputs[what]], theirs), theirs)
            grads = part("grad.", tensors)
            assert not grads or grads.keys() == params.keys(), sorted(grads.keys() ^ params.keys())
            for k, g in grads.items():
                assert_close(f"gradient of {k}", params[k].grad, g)
        optimizer.step()
        if json.loads(meta["after_step"]):
            method.after_step(config, model, step + 1)
    state, after = model.state_dict(), part("after.", tensors)
    assert not after or params.keys() <= after.keys() <= state.keys(), sorted(after.keys() ^ state.keys())
    for k, v in after.items():
        assert_close(f"{k} after the steps", state[k], v)
