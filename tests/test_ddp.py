"""Two processes (DDP over gloo on CPU) log the same gathered metrics and reach the same weights as one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from network import free_port
from torch.utils.data import DataLoader, DistributedSampler

from expo_bench.contracts import whole_batch
from expo_bench.methods.dpo import DPO
from expo_bench.optim import OptimizerConfig
from expo_bench.tabular.data import TabularPairDataset, TabularPairs, sample_pairs
from expo_bench.tabular.policy import TabularPolicy

PI_REF = torch.tensor([[0.4, 0.4, 0.2], [0.2, 0.5, 0.3]])
PAIRS = sample_pairs([[0.6, 0.3, 0.1], [0.5, 0.25, 0.25]], draws_per_prompt=16, seed=5)  # 20 pairs


class InOrder(L.LightningDataModule):
    """The same pairs for training and validation, never shuffled, so 2 ranks × batch b = 1 rank × batch 2b."""

    def __init__(self, pairs: TabularPairs, batch_size: int) -> None:
        super().__init__()
        self.pairs, self.batch_size = pairs, batch_size

    def _loader(self) -> DataLoader[Any]:
        dataset = TabularPairDataset(self.pairs, PI_REF)
        world, rank = self.trainer.world_size, self.trainer.global_rank  # type: ignore[union-attr]
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)  # rank r gets r, r+world, ...
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=whole_batch)

    def train_dataloader(self) -> DataLoader[Any]:
        return self._loader()

    def val_dataloader(self) -> DataLoader[Any]:
        return self._loader()


def train_and_validate(devices: int, batch_size: int) -> tuple[dict[str, float], torch.Tensor]:
    """Fit two epochs; the validation after the last epoch scores the final weights."""
    L.seed_everything(0, verbose=False)
    module = DPO(TabularPolicy(PI_REF), TabularPolicy(PI_REF), [DPO.Params(beta=0.5, gamma=0.1)], OptimizerConfig(lr=0.05))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the data module shards in order itself
    )
    trainer.fit(module, datamodule=InOrder(PAIRS, batch_size))
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith("val/")}
    return metrics, module.policy.logits.detach().clone()


def ddp_rank(rank: int, world: int, port: int, result: Path) -> None:
    """One DDP rank, launched here rather than by Lightning, so it can leave the process group cleanly."""
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world)}
    os.environ |= {"NODE_RANK": "0", "LOCAL_RANK": str(rank), "RANK": str(rank)}
    metrics, logits = train_and_validate(devices=world, batch_size=2)
    if rank == 0:
        torch.save({"metrics": metrics, "logits": logits}, result)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_two_ranks_match_one_process(tmp_path: Path) -> None:
    assert len(PAIRS) % 4 == 0, len(PAIRS)  # equal shards: no padding by the distributed sampler
    one_metrics, one_logits = train_and_validate(devices=1, batch_size=4)
    result = tmp_path / "rank0.pt"
    torch.multiprocessing.start_processes(ddp_rank, args=(2, free_port(), result), nprocs=2, start_method="spawn")
    two = torch.load(result, weights_only=True)
    torch.testing.assert_close(two["logits"], one_logits, rtol=0, atol=1e-6)  # gradients averaged across ranks
    assert set(two["metrics"]) == set(one_metrics) >= {"val/loss", "val/rewards_accuracy", "val/rewards_margin"}
    for name, value in one_metrics.items():
        assert two["metrics"][name] == pytest.approx(value, abs=1e-6), name
    assert one_metrics["val/rewards_accuracy"] not in (0.0, 0.5, 1.0)  # the metrics say something
