"""The fine-tuning view's RandAugment and random erasing, checked by behaviour only (any correct
implementation passes): switched on, the view is a function of the sample's seed, different for
different seeds and the same for the same seed; switched off, the view does not depend on the seed."""

import torch

from mimkit.data.loader import SeededViews
from mimkit.eval.augment import FinetuneView


class HorizontalStripes(torch.utils.data.Dataset):
    """32x32 RGB images constant along x: a horizontal flip leaves them unchanged, so the only randomness
    left in a full-image crop is RandAugment's and random erasing's."""

    def __len__(self):
        return 2

    def __getitem__(self, i):
        rows = (torch.arange(32) * (7 + i) % 256).to(torch.uint8)
        return rows.view(1, 32, 1).expand(3, 32, 32).clone(), i


def views(auto_augment: str | None, reprob: float) -> SeededViews:
    return SeededViews(HorizontalStripes(), FinetuneView(32, [0.5] * 3, [0.25] * 3, crop_scale=(1.0, 1.0),
                                                          auto_augment=auto_augment, reprob=reprob))


def test_randaugment_and_random_erasing_follow_the_seed():
    policy = "rand-m9-mstd0.5-inc1"
    for ops, reprob in ((policy, 0.0), (None, 1.0), (policy, 1.0)):  # RandAugment, random erasing, both
        augmented = views(ops, reprob)
        for index in range(2):
            seen = [augmented[(index, seed)]["image"] for seed in range(8)]
            assert torch.equal(augmented[(index, 3)]["image"], seen[3]), (ops, reprob)
            assert any(not torch.equal(seen[0], other) for other in seen[1:]), (ops, reprob)
    plain = views(None, 0.0)
    for index in range(2):
        first = plain[(index, 0)]["image"]
        assert all(torch.equal(plain[(index, seed)]["image"], first) for seed in range(1, 8))
