"""tl/engine/distributed.py: under torchrun each process takes its share of one weighted draw
(WeightedShardSampler), dealt out with nothing lost, another each epoch, and the loaders use it."""

from __future__ import annotations

import torch

from tl.data import make_loaders
from tl.engine import distributed


def test_under_torchrun_each_process_takes_its_share_of_one_weighted_draw(monkeypatch):
    weights = torch.tensor([1.0] * 9 + [5.0] * 2)
    shares = [distributed.WeightedShardSampler(weights, 2, rank, seed=4) for rank in (0, 1)]
    for epoch in (0, 1):
        for s in shares:
            s.set_epoch(epoch)
        drawn = torch.multinomial(weights.double(), 12, replacement=True,
                                  generator=torch.Generator().manual_seed(4 + epoch)).tolist()
        assert list(shares[0]) == drawn[0::2] and list(shares[1]) == drawn[1::2]  # dealt out, nothing lost
        assert len(shares[0]) == len(shares[1]) == 6
    assert list(shares[0]) != list(distributed.WeightedShardSampler(weights, 2, 0, seed=4))  # epoch 1 != epoch 0
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    loader = make_loaders({"train": torch.utils.data.TensorDataset(torch.arange(11.0))}, 4, seed=4,
                          sample_weights=weights, shard=distributed.sampler)["train"]
    assert isinstance(loader.sampler, distributed.WeightedShardSampler) and loader.sampler.rank == 1
    distributed.set_epoch(loader, 1)
    assert [int(x) for (batch,) in loader for x in batch] == list(shares[1])
