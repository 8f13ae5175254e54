"""Parity with TRL 1.16.0, an independent implementation (a pinned test-only dependency).

TRL's own loss code runs on a toy language model whose next-token logits are free parameters:
``DPOTrainer._compute_loss`` (DPO, per-token IPO, f-DPO JS) with a stand-in ``self`` and a model that scores its
``labels`` the way TRL's fused LM head does, and ``CPOTrainer.cpo_loss`` / ``get_batch_logps`` (SimPO, cDPO,
summed IPO). Our side scores the same logits through the method classes; losses and gradients must agree.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn
from torch.testing import assert_close

from expo_bench.contracts import PreferenceBatch, Sequences
from expo_bench.methods import PreferenceMethod, method_class
from expo_bench.optim import OptimizerConfig

trl = pytest.importorskip("trl")
CPOTrainer = pytest.importorskip("trl.experimental.cpo.cpo_trainer").CPOTrainer
DPOTrainer = pytest.importorskip("trl.trainer.dpo_trainer").DPOTrainer

PAIRS, LENGTH, VOCAB = 6, 12, 11
SEEDS = [0, 1, 2, 3]


def test_pinned_version():
    assert trl.__version__ == "1.16.0"


def token_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """log π(labels[t + 1] | ..t) at each position t, 0 where the next label is -100 (as TRL's fused LM head)."""
    targets = labels[:, 1:]
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return logps.masked_fill(targets == -100, 0.0)


class LogitScorer(nn.Module):
    """Our side of the toy LM: summed log-probs of each completion, rows picked by ``sequences["row"]``."""

    def __init__(self, logits: Tensor, input_ids: Tensor, completion_mask: Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits.clone())
        self.labels = input_ids.masked_fill(completion_mask == 0, -100)

    def sequence_logps(self, sequences: Sequences) -> Tensor:
        rows = sequences["row"]
        return token_logps(self.logits[rows], self.labels[rows]).sum(-1)


def random_pairs(seed: int, min_completion: int = 0) -> dict[str, Tensor]:
    """``PAIRS`` chosen rows then ``PAIRS`` rejected rows: prompts of 1-3 tokens, completions of varying length."""
    generator = torch.Generator().manual_seed(seed)
    rows = 2 * PAIRS
    prompt = torch.randint(1, 4, (rows, 1), generator=generator)
    end = prompt + torch.randint(min_completion, LENGTH - 4, (rows, 1), generator=generator)
    position = torch.arange(LENGTH)
    return {
        "input_ids": torch.randint(0, VOCAB, (rows, LENGTH), generator=generator),
        "attention_mask": (position < end).long(),
        "completion_mask": ((position >= prompt) & (position < end)).long(),
        "policy_logits": 2 * torch.randn(rows, LENGTH, VOCAB, generator=generator),
        "reference_logits": 2 * torch.randn(rows, LENGTH, VOCAB, generator=generator),
    }


def ours(name: str, params: dict, data: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Our loss (mean over pairs) and its gradient in the policy logits, through the method class."""
    cls: type[PreferenceMethod] = method_class(name)
    policy = LogitScorer(data["policy_logits"], data["input_ids"], data["completion_mask"])
    reference = LogitScorer(data["reference_logits"], data["input_ids"], data["completion_mask"])
    module = cls(policy, None if cls.reference_free else reference, [cls.Params(**params)], OptimizerConfig())
    tokens = data["completion_mask"].sum(-1)
    batch = PreferenceBatch(
        chosen={"row": torch.arange(PAIRS)},
        rejected={"row": torch.arange(PAIRS, 2 * PAIRS)},
        chosen_tokens=tokens[:PAIRS],
        rejected_tokens=tokens[PAIRS:],
        label=torch.ones(PAIRS),
    )
    loss = torch.stack(list(module.objective(module.pair_logps(batch), batch).values())).sum(0).squeeze()
    loss.backward()
    return loss.detach(), policy.logits.grad


def trl_dpo_trainer(data: dict[str, Tensor], loss_type: str, beta: float, f_divergence_type: str) -> tuple[Tensor, Tensor]:
    """``DPOTrainer._compute_loss`` with a stand-in trainer, precomputed reference log-probs and a toy model."""
    logits = data["policy_logits"].clone().requires_grad_()

    def model(
        *, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, fused_lm_head: bool, use_cache: bool
    ) -> SimpleNamespace:
        assert fused_lm_head and torch.equal(input_ids, data["input_ids"])
        zeros = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1)
        return SimpleNamespace(log_probs=token_logps(logits, labels), entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    labels = data["input_ids"].masked_fill(data["completion_mask"] == 0, -100)
    reference = token_logps(data["reference_logits"], labels).sum(-1)
    inputs = {key: data[key] for key in ("input_ids", "attention_mask", "completion_mask")}
    inputs |= {"ref_chosen_logps": reference[:PAIRS], "ref_rejected_logps": reference[PAIRS:]}

    def identity(tensor: Tensor) -> Tensor:
        return tensor

    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=identity, gather_for_metrics=identity),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type=f_divergence_type,
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    loss.backward()
    assert trainer._metrics["train"]["rewards/margins"], "TRL ran its whole loss path"
    return loss.detach(), logits.grad


def trl_cpo(data: dict[str, Tensor], loss_type: str, beta: float, **config: float) -> tuple[Tensor, Tensor]:
    """``CPOTrainer.cpo_loss`` on TRL's ``get_batch_logps``: per-token means for SimPO, else summed log-ratios."""
    logits = data["policy_logits"].clone().requires_grad_()
    labels = data["input_ids"].masked_fill(data["completion_mask"] == 0, -100)
    if loss_type == "simpo":
        scores = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    else:  # log-ratios in place of log-probs, so that TRL's logits are our h
        scores = CPOTrainer.get_batch_logps(logits, labels) - CPOTrainer.get_batch_logps(data["reference_logits"], labels)
    trainer = SimpleNamespace(
        alpha=0.0,
        accelerator=SimpleNamespace(device=torch.device("cpu")),
        loss_type=loss_type,
        beta=beta,
        label_smoothing=config.get("label_smoothing", 0.0),
        simpo_gamma=config.get("simpo_gamma", 0.0),
    )
    losses, _, _ = CPOTrainer.cpo_loss(trainer, scores[:PAIRS], scores[PAIRS:])
    loss = losses.mean()
    loss.backward()
    return loss.detach(), logits.grad


DPO_TRAINER_CASES = [
    pytest.param("dpo", {"beta": 0.5}, "sigmoid", 0.5, "reverse_kl", id="dpo"),
    pytest.param("ipo", {"tau": 0.5, "length_normalize": True}, "ipo", 0.5, "reverse_kl", id="ipo-per-token"),
    pytest.param("fdpo_js", {"beta": 0.5}, "sigmoid", 0.5, "js_divergence", id="fdpo-js"),
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("name", "params", "loss_type", "beta", "f_divergence_type"), DPO_TRAINER_CASES)
def test_dpo_trainer_parity(name, params, loss_type, beta, f_divergence_type, seed):
    data = random_pairs(seed)
    loss, grad = ours(name, params, data)
    trl_loss, trl_grad = trl_dpo_trainer(data, loss_type, beta, f_divergence_type)
    assert_close(loss, trl_loss)
    assert_close(grad, trl_grad)
    assert grad.abs().max() > 1e-4


CPO_CASES = [
    # TRL's simpo_gamma is our absolute γ
    pytest.param("simpo", {"beta": 2.0, "gamma": 0.8}, "simpo", 2.0, {"simpo_gamma": 0.8}, id="simpo"),
    pytest.param("dpo", {"beta": 0.3, "label_smoothing": 0.2}, "sigmoid", 0.3, {"label_smoothing": 0.2}, id="cdpo"),
    # TRL's beta is IPO's τ
    pytest.param("ipo", {"tau": 0.3}, "ipo", 0.3, {}, id="ipo-summed"),
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("name", "params", "loss_type", "beta", "config"), CPO_CASES)
def test_cpo_loss_parity(name, params, loss_type, beta, config, seed):
    data = random_pairs(seed, min_completion=1)  # TRL's per-token mean divides by zero on an empty completion
    loss, grad = ours(name, params, data)
    trl_loss, trl_grad = trl_cpo(data, loss_type, beta, **config)
    assert_close(loss, trl_loss)
    assert_close(grad, trl_grad)
    assert grad.abs().max() > 1e-4


def test_ipo_sum_and_per_token_differ():
    """The IPO option matters: summed (IPO paper) and per-token (TRL's DPOTrainer) disagree on varying lengths."""
    data = random_pairs(0)
    summed, _ = ours("ipo", {"tau": 0.5}, data)
    per_token, _ = ours("ipo", {"tau": 0.5, "length_normalize": True}, data)
    trl_loss, _ = trl_dpo_trainer(data, "ipo", 0.5, "reverse_kl")
    assert_close(per_token, trl_loss)
    assert not torch.allclose(summed, trl_loss, rtol=0.01)
