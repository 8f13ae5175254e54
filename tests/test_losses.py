"""The losses proved with numbers: hand-derived values, the EXPO authors' formula, properties, gradients, robustness."""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.testing import assert_close

from expo_bench.contracts import PreferenceBatch, SampleLogps, Sequences
from expo_bench.methods import PreferenceMethod, UnknownMethodError, available_methods, method_class, preference_nll
from expo_bench.methods.base import clip_per_replica
from expo_bench.methods.dpo import dpo_loss
from expo_bench.methods.expo_compositional import EXPOCompositional, expo_compositional_loss
from expo_bench.methods.expo_regression import expo_regression_loss
from expo_bench.methods.fdpo_js import fdpo_js_loss
from expo_bench.methods.ipo import ipo_loss
from expo_bench.methods.simpo import simpo_loss
from expo_bench.optim import OptimizerConfig
from expo_bench.tabular.data import TabularPairs, make_batch, population_pairs, sample_pairs
from expo_bench.tabular.policy import TabularPolicy

METHODS = sorted(available_methods())
"""Every built-in method: the method-wide tests below run over the registry, so a new method file is covered."""


class FixedScorer(nn.Module):
    """Summed log-probs given directly, looked up by ``sequences["index"]``."""

    def __init__(self, logps: Tensor) -> None:
        super().__init__()
        self.logps = nn.Parameter(logps)

    def sequence_logps(self, sequences: Sequences) -> Tensor:
        return self.logps[sequences["index"]]


def build(name: str, policy: nn.Module, reference: nn.Module | None, *params: dict) -> PreferenceMethod:
    cls = method_class(name)
    return cls(policy, None if cls.reference_free else reference, [cls.Params(**p) for p in params], OptimizerConfig())


def pair_batch(tokens: tuple[int, int] = (1, 1), label: float = 1.0, reference: Tensor | None = None) -> PreferenceBatch:
    """One pair: chosen is sequence 0, rejected sequence 1; KL samples are both, weighted ½ each."""
    return PreferenceBatch(
        chosen={"index": torch.tensor([0])},
        rejected={"index": torch.tensor([1])},
        chosen_tokens=torch.tensor([tokens[0]]),
        rejected_tokens=torch.tensor([tokens[1]]),
        label=torch.tensor([label]),
        reference_chosen_logps=None if reference is None else reference[:1],
        reference_rejected_logps=None if reference is None else reference[1:],
        kl_samples={"index": torch.tensor([0, 1])},
        kl_weights=torch.tensor([0.5, 0.5]),
    )


def terms(module: PreferenceMethod, batch: PreferenceBatch) -> dict[str, Tensor]:
    return module.objective(module.pair_logps(batch), batch)


def total(module: PreferenceMethod, batch: PreferenceBatch) -> Tensor:
    """Per-replica loss, as training_step sums it."""
    return torch.stack(list(terms(module, batch).values())).sum(0)


def nll(s: float) -> float:
    """-log σ(s) = log(1 + e^{-s})."""
    return math.log1p(math.exp(-s))


def sigmoid(s: float) -> float:
    return 1 / (1 + math.exp(-s))


# -- hand-derived values --------------------------------------------------------------------------------------------

# Policy chosen/rejected -1, -2 and reference -1.5, -1.5: d_pol = 1, d_ref = 0, h = 1.
P, R = (-1.0, -2.0), (-1.5, -1.5)
# f-DPO JS: t(y) = log 2π(y) - log(π(y) + π_ref(y)) from probabilities π(y_w)=.5, π_ref(y_w)=.25, π(y_l)=.1, π_ref(y_l)=.3.
JS_MARGIN = (math.log(2 * 0.5) - math.log(0.5 + 0.25)) - (math.log(2 * 0.1) - math.log(0.1 + 0.3))
# EXPO-regression with reference -2, -1: d_ref = -1, p_ref = σ(-1); target t = (1 - .4)·1 + .4·σ(-1).
REG_TARGET = 0.6 + 0.4 * sigmoid(-1.0)

HAND_CASES = [
    # -log σ(β h) = log(1 + e^{-0.1})
    pytest.param("dpo", {"beta": 0.1}, P, R, (1, 1), 1.0, {"loss": 0.6443966600735709}, id="dpo"),
    # cDPO, ε = 0.1: z' = 0.9
    pytest.param(
        "dpo", {"beta": 0.1, "label_smoothing": 0.1}, P, R, (1, 1), 1.0, {"loss": 0.9 * nll(0.1) + 0.1 * nll(-0.1)}, id="cdpo"
    ),
    # margin: -log σ(β h - γ) = -log σ(0.1 - 0.5)
    pytest.param("dpo", {"beta": 0.1, "gamma": 0.5}, P, R, (1, 1), 1.0, {"loss": nll(-0.4)}, id="dpo-margin"),
    # soft label z = .25 with margin: -(.25 log σ(.1 - .5) + .75 log σ(-.1 - .5))
    pytest.param(
        "dpo", {"beta": 0.1, "gamma": 0.5}, P, R, (1, 1), 0.25, {"loss": 0.25 * nll(-0.4) + 0.75 * nll(-0.6)}, id="dpo-soft"
    ),
    # (h - 1/(2τ))² = (1 - 2)²
    pytest.param("ipo", {"tau": 0.25}, P, R, (1, 1), 1.0, {"loss": 1.0}, id="ipo"),
    # z (h - 2)² + (1 - z)(h + 2)² = .75·1 + .25·9
    pytest.param("ipo", {"tau": 0.25}, P, R, (1, 1), 0.75, {"loss": 3.0}, id="ipo-soft"),
    # margin: (h - γ - 1/(2τ))² = (1 - 0.5 - 2)²
    pytest.param("ipo", {"tau": 0.25, "gamma": 0.5}, P, R, (1, 1), 1.0, {"loss": 2.25}, id="ipo-margin"),
    # per token: h = (-1/2 + 2/4) - (-1.5/2 + 1.5/4) = 0.375; (0.375 - 2)²
    pytest.param("ipo", {"tau": 0.25, "length_normalize": True}, P, R, (2, 4), 1.0, {"loss": 1.625**2}, id="ipo-per-token"),
    # β(-6/3 + 12/4) - γ = 2·1 - 1 = 1
    pytest.param("simpo", {"beta": 2.0, "gamma": 1.0}, (-6.0, -12.0), None, (3, 4), 1.0, {"loss": nll(1.0)}, id="simpo"),
    pytest.param(
        "fdpo_js",
        {"beta": 0.5},
        (math.log(0.5), math.log(0.1)),
        (math.log(0.25), math.log(0.3)),
        (1, 1),
        1.0,
        {"loss": nll(0.5 * JS_MARGIN)},
        id="fdpo-js",
    ),
    # DPO on h = 1 - 0.7 = 0.3, plus λ_KL·KL on the reference samples y0, y1 (weights ½): 2·½((-0.5 + 1) + (-1.2 + 2))
    pytest.param(
        "dpo_kl",
        {"beta": 0.1, "kl_lam": 2.0},
        P,
        (-0.5, -1.2),
        (1, 1),
        1.0,
        {"loss": nll(0.03), "kl": 2 * 0.65},
        id="dpo-kl",
    ),
    # DPO on h = 1, plus α·(-log π(y_w)/|y_w|) = 0.5·(1/2)
    pytest.param("rpo", {"beta": 0.1, "alpha": 0.5}, P, R, (2, 4), 1.0, {"loss": nll(0.1), "nll": 0.25}, id="rpo"),
    # the same with per-token log-probs in the pair term: h = (-1/2 + 2/4) - (-1.5/2 + 1.5/4) = 0.375; the NLL is unchanged
    pytest.param(
        "rpo",
        {"beta": 0.1, "alpha": 0.5, "length_normalize": True},
        P,
        R,
        (2, 4),
        1.0,
        {"loss": nll(0.0375), "nll": 0.25},
        id="rpo-per-token",
    ),
    # BT on d_pol = 1; KL ≈ ½((-0.5 + 1) + (-1.2 + 2)) = 0.65 on the dataset responses, times λ = 2
    pytest.param(
        "expo_compositional",
        {"lam": 2.0, "kl_estimator": "dataset_responses"},
        P,
        (-0.5, -1.2),
        (1, 1),
        0.75,
        {"bradley_terry": 0.75 * nll(1.0) + 0.25 * nll(-1.0), "kl": 2 * 0.65},
        id="expo-compositional-dataset",
    ),
    # margin γ = 0.5 on the policy's own preference: -log σ(1 - 0.5)
    pytest.param(
        "expo_compositional",
        {"lam": 2.0, "gamma": 0.5, "kl_estimator": "dataset_responses"},
        P,
        (-0.5, -1.2),
        (1, 1),
        1.0,
        {"bradley_terry": nll(0.5), "kl": 2 * 0.65},
        id="expo-compositional-margin",
    ),
    # reference samples y0, y1 with weights ½: KL ≈ ½(-0.5 + 1) + ½(-1.2 + 2), times λ·kl_scale = 2·0.5
    pytest.param(
        "expo_compositional",
        {"lam": 2.0, "kl_scale": 0.5},
        P,
        (-0.5, -1.2),
        (1, 1),
        1.0,
        {"bradley_terry": nll(1.0), "kl": 0.65},
        id="expo-compositional-samples",
    ),
    # -(t log σ(1) + (1 - t) log σ(-1))
    pytest.param(
        "expo_regression",
        {"lam": 0.4},
        P,
        (-2.0, -1.0),
        (1, 1),
        1.0,
        {"loss": REG_TARGET * nll(1.0) + (1 - REG_TARGET) * nll(-1.0)},
        id="expo-regression-bce",
    ),
    # margin on whichever side the target favours: -(t log σ(1 - γ) + (1 - t) log σ(-1 - γ)), γ = 0.5
    pytest.param(
        "expo_regression",
        {"lam": 0.4, "gamma": 0.5},
        P,
        (-2.0, -1.0),
        (1, 1),
        1.0,
        {"loss": REG_TARGET * nll(0.5) + (1 - REG_TARGET) * nll(-1.5)},
        id="expo-regression-margin",
    ),
    pytest.param(
        "expo_regression",
        {"lam": 0.4, "distance": "squared"},
        P,
        (-2.0, -1.0),
        (1, 1),
        0.0,
        # Brier score (p - t)² + t(1 - t) with z = 0: t = .4·σ(-1)
        {"loss": (sigmoid(1.0) - 0.4 * sigmoid(-1.0)) ** 2 + 0.4 * sigmoid(-1.0) * (1 - 0.4 * sigmoid(-1.0))},
        id="expo-regression-squared",
    ),
]


@pytest.mark.parametrize(("name", "params", "policy", "reference", "tokens", "label", "expected"), HAND_CASES)
def test_hand_derived_values(name, params, policy, reference, tokens, label, expected):
    reference = None if reference is None else FixedScorer(torch.tensor(reference))
    module = build(name, FixedScorer(torch.tensor(policy)), reference, params)
    got = {term: float(value.detach()) for term, value in terms(module, pair_batch(tokens, label)).items()}
    assert got == pytest.approx(expected, rel=1e-6)


def test_dpo_value_from_the_example():
    h = (-1.0 - -2.0) - (-1.5 - -1.5)
    loss = dpo_loss(torch.tensor(h, dtype=torch.float64), 1.0, 0.1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.1)), rel=1e-12)
    assert math.log(1 + math.exp(-0.1)) == pytest.approx(0.6443966600735709, rel=1e-15)


def test_reference_cached_in_the_batch_equals_reference_model():
    policy, reference = torch.tensor(P), torch.tensor((-0.5, -1.2))
    module = build("expo_regression", FixedScorer(policy), FixedScorer(reference), {"lam": 0.4})
    assert_close(total(module, pair_batch(reference=reference)), total(module, pair_batch()))
    assert total(module, pair_batch(reference=reference.flip(0))).item() != pytest.approx(total(module, pair_batch()).item())


def test_expo_compositional_tabular_value():
    """π = [.2, .5, .3], π_ref = [.5, .3, .2], pair 0 ≻ 1: BT = -log σ(log(.2/.5)) = log 3.5; KL(π_ref ‖ π) exactly."""
    pi_ref = torch.tensor([[0.5, 0.3, 0.2]])
    policy = TabularPolicy(pi_ref)
    policy.logits.data = torch.tensor([[[0.2, 0.5, 0.3]]]).log()
    pairs = TabularPairs(torch.tensor([0]), torch.tensor([0]), torch.tensor([1]), torch.tensor([1.0]))
    module = build("expo_compositional", policy, TabularPolicy(pi_ref), {"lam": 0.7})
    got = {term: float(value.detach()) for term, value in terms(module, make_batch(pairs, torch.tensor([0]), pi_ref)).items()}
    kl = 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.5) + 0.2 * math.log(0.2 / 0.3)
    assert got == pytest.approx({"bradley_terry": math.log(3.5), "kl": 0.7 * kl}, rel=1e-6)


# -- the EXPO authors' formulation ------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
def test_expo_compositional_matches_authors_tabular_formula():
    """Their loss: BT NLL on the policy's own preference + λ·F.kl_div(log π, π_ref, "mean") = λ·KL(π_ref ‖ π)/3."""
    lam, pi_ref = 2.0, torch.tensor([[0.4, 0.4, 0.2]])
    pairs = sample_pairs([[0.6, 0.3, 0.1]], 40, seed=3)
    batch = make_batch(pairs, torch.arange(len(pairs)), pi_ref)
    policy = TabularPolicy(pi_ref)
    policy.logits.data += torch.tensor([0.3, -0.2, 0.5])
    ours = total(build("expo_compositional", policy, TabularPolicy(pi_ref), {"lam": lam, "kl_scale": 1 / 3}), batch)
    ours.sum().backward()

    logits = policy.logits.detach()[0, 0].clone().requires_grad_()
    log_pi = torch.log_softmax(logits, -1)
    kl_div = F.kl_div(log_pi, pi_ref[0], reduction="mean")
    theirs = -F.logsigmoid(log_pi[pairs.chosen] - log_pi[pairs.rejected]).mean() + lam * kl_div
    theirs.backward()

    assert_close(kl_div, (pi_ref[0] * (pi_ref[0].log() - log_pi)).sum() / 3)
    assert_close(ours, theirs.reshape(1))
    assert_close(policy.logits.grad[0, 0], logits.grad)
    assert logits.grad.abs().max() > 1e-2


# -- properties -----------------------------------------------------------------------------------------------------


def population_gradient(name: str, params: dict, pi_star: list[float], pi_ref: list[float]) -> Tensor:
    """Gradient in the logits of the exact population objective, at π = π_ref."""
    reference = torch.tensor([pi_ref])
    pairs = population_pairs([pi_star])
    policy = TabularPolicy(reference)
    module = build(name, policy, TabularPolicy(reference), params)
    total(module, make_batch(pairs, torch.arange(len(pairs)), reference)).sum().backward()
    return policy.logits.grad


@pytest.mark.parametrize("lam", [1e-3, 1.0, 10.0, 100.0])
def test_expo_compositional_preserves_reference_that_is_optimal(lam):
    """Both terms vanish exactly; float32 leaves λ·(softmax(log π_ref) - π_ref) ≈ λ·2.4e-8, hence the tolerance."""
    grad = population_gradient("expo_compositional", {"lam": lam}, [0.6, 0.3, 0.1], [0.6, 0.3, 0.1])
    assert_close(grad, torch.zeros_like(grad), atol=1e-6 * max(1.0, lam / 10), rtol=0)


@pytest.mark.parametrize(("name", "params"), [("dpo", {"beta": 0.1}), ("ipo", {"tau": 0.1}), ("fdpo_js", {"beta": 0.1})])
def test_dpo_family_moves_away_from_optimal_reference(name, params):
    grad = population_gradient(name, params, [0.6, 0.3, 0.1], [0.6, 0.3, 0.1])
    assert grad.abs().max() > 1e-3


def test_dpo_population_gradient_value():
    """At h = 0: ∂ℓ/∂h = -β(z - ½) per pair, z = p*(i ≻ j), then through ∂h/∂θ = e_i - e_j (log-softmax cancels)."""
    pi = [0.6, 0.3, 0.1]
    expected = torch.zeros(3)
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        slope = -0.1 * (pi[i] / (pi[i] + pi[j]) - 0.5) / 3
        expected[i] += slope
        expected[j] -= slope
    assert_close(population_gradient("dpo", {"beta": 0.1}, pi, pi)[0, 0], expected)


@pytest.mark.parametrize("distance", ["bce", "squared"])
def test_expo_regression_at_lam_one_stays_at_reference(distance):
    grad = population_gradient("expo_regression", {"lam": 1.0, "distance": distance}, [0.6, 0.3, 0.1], [0.4, 0.4, 0.2])
    assert_close(grad, torch.zeros_like(grad), atol=1e-7, rtol=0)
    moved = population_gradient("expo_regression", {"lam": 0.5, "distance": distance}, [0.6, 0.3, 0.1], [0.4, 0.4, 0.2])
    assert moved.abs().max() > 1e-3


def test_expo_regression_at_lam_zero_is_bradley_terry():
    torch.manual_seed(0)
    d_pol, d_ref = torch.randn(2, 50, dtype=torch.float64) * 5
    z = torch.rand(50, dtype=torch.float64)
    assert_close(expo_regression_loss(d_pol, d_ref, 1.0, 0.0), -F.logsigmoid(d_pol))
    assert_close(expo_regression_loss(d_pol, d_ref, z, 0.0), -(z * F.logsigmoid(d_pol) + (1 - z) * F.logsigmoid(-d_pol)))


def test_preference_nll_is_symmetric_under_flipping_the_pair():
    torch.manual_seed(0)
    s, z = torch.randn(50, dtype=torch.float64) * 3, torch.rand(50, dtype=torch.float64)
    for gamma in (0.0, 0.7):
        assert_close(preference_nll(s, z, gamma), preference_nll(-s, 1 - z, gamma))
    # and through a method: swapping chosen with rejected and z with 1 - z leaves DPO's loss unchanged
    policy, reference = FixedScorer(torch.tensor([-1.0, -2.5])), FixedScorer(torch.tensor([-1.4, -1.3]))
    module = build("dpo", policy, reference, {"beta": 0.3, "gamma": 0.2})
    one = torch.ones(1)
    flipped = PreferenceBatch({"index": torch.tensor([1])}, {"index": torch.tensor([0])}, one, one, torch.tensor([0.2]))
    assert_close(total(module, pair_batch(label=0.8)), total(module, flipped))
    assert total(module, pair_batch(label=0.8)).item() != pytest.approx(total(module, pair_batch(label=0.2)).item())


# -- gradients ------------------------------------------------------------------------------------------------------


def leaves(n: int, *shape: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(n)
    return [(-3 * torch.rand(*shape, generator=generator, dtype=torch.float64)).requires_grad_() for _ in range(n)]


Z = torch.tensor([1.0, 0.8, 0.3, 0.0], dtype=torch.float64)
GRADCHECKS = {
    "preference_nll": (lambda s: preference_nll(s, Z, 0.4), 1),
    "dpo": (lambda h: dpo_loss(h, Z, 0.7, 0.3, 0.1), 1),
    "ipo": (lambda h: ipo_loss(h, Z, 0.2, 0.3), 1),
    "simpo": (lambda pc, pr: simpo_loss(pc, pr, Z, 2.0, 0.5), 2),
    "fdpo_js": (lambda pc, pr, rc, rr: fdpo_js_loss(pc, pr, rc, rr, Z, 0.9, 0.2), 4),
    "expo_compositional": (lambda d, kl: expo_compositional_loss(d, Z, kl, 0.6, 0.3), 2),
    "expo_regression_bce": (lambda d, r: expo_regression_loss(d, r, Z, 0.3, "bce", 0.2), 2),
    "expo_regression_squared": (lambda d, r: expo_regression_loss(d, r, Z, 0.3, "squared", 0.2), 2),
}


@pytest.mark.parametrize("name", list(GRADCHECKS))
def test_gradcheck(name):
    loss, arity = GRADCHECKS[name]
    assert torch.autograd.gradcheck(loss, leaves(arity, 4))


# -- robustness -----------------------------------------------------------------------------------------------------

ROBUST_PARAMS = {
    "dpo": {"beta": 0.1, "label_smoothing": 0.1, "gamma": 0.5},
    "ipo": {"tau": 0.1},
    "simpo": {},
    "fdpo_js": {"beta": 0.1},
    "expo_compositional": {"lam": 0.5},
    "expo_regression": {"lam": 0.5, "distance": "squared"},
}


def finite_loss_and_gradient(module: PreferenceMethod, batch: PreferenceBatch) -> Tensor:
    loss = total(module, batch)
    loss.sum().backward()
    assert torch.isfinite(loss).all(), loss
    assert torch.isfinite(module.policy.logps.grad).all(), module.policy.logps.grad
    return loss


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("tokens", [(0, 5), (0, 0)])
def test_empty_responses_length_normalized(name, tokens):
    policy = FixedScorer(torch.tensor([0.0, -7.0 if tokens[1] else 0.0]))
    reference = FixedScorer(torch.tensor([0.0, -6.0 if tokens[1] else 0.0]))
    module = build(name, policy, reference, {**ROBUST_PARAMS.get(name, {}), "length_normalize": True})
    batch = pair_batch(tokens)
    assert module.pair_logps(batch).policy_chosen.item() == 0.0
    empty = finite_loss_and_gradient(module, batch)
    assert_close(empty, total(module, pair_batch((1, max(tokens[1], 1)))))


EXTREME = [
    ((-1e-8, -1e4), (-1e4, -1e-8)),  # margins +1e4, h = +2e4
    ((-1e4, -1e-8), (-1e-8, -1e4)),  # margins -1e4, h = -2e4
    ((-1e4, -1e4), (-1e-8, -1e4)),
]


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("policy", "reference"), EXTREME)
def test_extreme_logps(name, dtype, policy, reference):
    """bf16/fp32 log-probs from the model and in the batch cache: cast to float32, finite, and as exact as float64."""
    policy, reference = torch.tensor(policy, dtype=dtype), torch.tensor(reference, dtype=dtype)
    module = build(name, FixedScorer(policy), FixedScorer(reference), ROBUST_PARAMS.get(name, {}))
    batch = pair_batch(reference=reference)
    assert module.pair_logps(batch).policy_chosen.dtype == torch.float32
    loss = finite_loss_and_gradient(module, batch)
    computed = module.pair_logps(batch)
    exact = replace(
        computed,
        policy_chosen=policy[:1].double(),
        policy_rejected=policy[1:].double(),
        reference_chosen=None if computed.reference_chosen is None else reference[:1].double(),
        reference_rejected=None if computed.reference_rejected is None else reference[1:].double(),
        samples=None
        if computed.samples is None
        else SampleLogps(policy.double(), reference.double(), computed.samples.weights.double()),
    )
    assert_close(loss.double(), torch.stack(list(module.objective(exact, batch).values())).sum(0), rtol=1e-6, atol=1e-6)


def test_saturated_preference_nll_values():
    s = torch.tensor([1e4, -1e4, 40.0, -40.0])
    assert_close(preference_nll(s, 1.0), torch.tensor([0.0, 1e4, math.exp(-40.0), 40.0]))
    assert_close(preference_nll(s.bfloat16().float(), 1.0), torch.tensor([0.0, 9984.0, math.exp(-40.0), 40.0]))


# -- replicas -------------------------------------------------------------------------------------------------------

GRID = {
    "dpo": ("beta", [0.05, 0.5, 3.0]),
    "ipo": ("tau", [0.05, 0.5, 3.0]),
    "simpo": ("beta", [0.5, 2.0, 4.0]),
    "fdpo_js": ("beta", [0.05, 0.5, 3.0]),
    "expo_compositional": ("lam", [1e-3, 0.5, 30.0]),
    "expo_regression": ("lam", [0.0, 0.3, 1.0]),
}


def replica_grid(name: str) -> list[dict[str, float]]:
    """Three replicas differing in γ and, where the method has one, its λ (the README's grid, else the default × ½, 1, 2)."""
    method = method_class(name)
    field = method.regularization
    if field is None:
        return [{"gamma": gamma} for gamma in (0.0, 0.5, 1.0)]
    default = method.Params.model_fields[field].default
    _, values = GRID.get(name, (field, [default / 2, default, 2 * default]))
    return [{field: value, "gamma": gamma} for value, gamma in zip(values, [0.0, 0.5, 1.0], strict=True)]


@pytest.mark.parametrize("name", METHODS)
def test_replicas_equal_separate_modules(name):
    grid = replica_grid(name)
    pi_ref = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
    pairs = sample_pairs([[0.6, 0.3, 0.1], [0.3, 0.3, 0.4]], 30, seed=1)
    batch = make_batch(pairs, torch.arange(len(pairs)), pi_ref)
    policy = TabularPolicy(pi_ref, replicas=len(grid))
    policy.logits.data += torch.randn(policy.logits.shape, generator=torch.Generator().manual_seed(0))
    replicated = build(name, policy, TabularPolicy(pi_ref), *grid)
    losses = total(replicated, batch)
    losses.sum().backward()
    assert losses.shape == (3,) and len(set(losses.tolist())) == 3
    for g, params in enumerate(grid):
        alone = TabularPolicy(pi_ref)
        alone.logits.data = policy.logits.data[g : g + 1].clone()
        loss = total(build(name, alone, TabularPolicy(pi_ref), params), batch)
        loss.backward()
        assert_close(losses[g : g + 1], loss)
        assert_close(policy.logits.grad[g : g + 1], alone.logits.grad)


def test_gradient_clipping_per_replica_equals_clipping_each_alone():
    """Replica gradient norms ≈ 30, 1 and 8, clipped to 5 each as torch.nn.utils.clip_grad_norm_ would alone."""
    grad = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0))
    grad *= torch.tensor([30.0, 1.0, 8.0])[:, None, None] / grad.flatten(1).norm(dim=1)[:, None, None]
    parameter = nn.Parameter(torch.zeros(3, 2, 4))
    parameter.grad = grad.clone()
    clip_per_replica([parameter], 5.0)
    for g in range(3):
        alone = nn.Parameter(torch.zeros(2, 4))
        alone.grad = grad[g].clone()
        torch.nn.utils.clip_grad_norm_([alone], 5.0)
        assert_close(parameter.grad[g], alone.grad)
    assert parameter.grad.flatten(1).norm(dim=1).tolist() == pytest.approx([5.0, 1.0, 5.0], rel=1e-5)


def test_only_numeric_params_may_vary_across_replicas():
    uniform = torch.ones(1, 3) / 3
    with pytest.raises(ValueError, match="distance"):
        build("expo_regression", TabularPolicy(uniform, 2), TabularPolicy(uniform), {"distance": "bce"}, {"distance": "squared"})


# -- registry -------------------------------------------------------------------------------------------------------


def test_available_methods():
    methods = available_methods()
    assert {"dpo", "ipo", "simpo", "fdpo_js", "expo_compositional", "expo_regression"} <= set(methods)
    assert all(cls.name == name for name, cls in methods.items())


def test_a_second_built_in_with_a_taken_name_is_an_error():
    with pytest.raises(TypeError, match=r"method name 'dpo' .* is taken by expo_bench\.methods\.dpo"):
        type("Impostor", (PreferenceMethod,), {"name": "dpo", "__module__": "expo_bench.methods.impostor"})
    assert available_methods()["dpo"].__module__ == "expo_bench.methods.dpo"


def test_a_user_method_named_like_a_built_in_is_refused(tmp_path, monkeypatch):
    (tmp_path / "clash.py").write_text(
        "from expo_bench.methods.dpo import DPO\n\nclass Mine(DPO):\n    name = 'ipo'\n\nclass Plain(DPO):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UnknownMethodError, match="calls itself 'ipo', the name of a built-in method"):
        method_class("clash:Mine")
    assert method_class("clash:Plain").__name__ == "Plain"  # a subclass does not inherit the built-in's name


def flipped_batch(label: float, reference: Tensor) -> PreferenceBatch:
    """``pair_batch`` with chosen and rejected swapped and the label z replaced by 1 - z."""
    return PreferenceBatch(
        chosen={"index": torch.tensor([1])},
        rejected={"index": torch.tensor([0])},
        chosen_tokens=torch.tensor([3]),
        rejected_tokens=torch.tensor([2]),
        label=torch.tensor([1 - label]),
        reference_chosen_logps=reference[1:],
        reference_rejected_logps=reference[:1],
        kl_samples={"index": torch.tensor([0, 1])},
        kl_weights=torch.tensor([0.5, 0.5]),
    )


@pytest.mark.parametrize("name", METHODS)
def test_every_method_honours_the_margin_and_the_symmetry_of_a_pair(name):
    """A flipped pair with a flipped label has the same loss, with and without a margin γ, which changes the loss."""
    reference = torch.tensor([-1.4, -1.3])
    method = method_class(name)
    losses = {}
    for gamma in (0.0, 0.6):
        module = build(name, FixedScorer(torch.tensor([-1.0, -2.5])), FixedScorer(reference), {"gamma": gamma})
        forward = total(module, pair_batch((2, 3), 0.8, reference))
        backward = total(module, flipped_batch(0.8, reference))
        assert_close(forward, backward)
        losses[gamma] = forward.item()
    assert method.takes_margin and losses[0.0] != pytest.approx(losses[0.6])


def test_a_method_with_its_own_objective_takes_no_margin():
    class Half(method_class("dpo")):  # type: ignore[misc]
        def objective(self, logps, batch):
            return {name: 0.5 * value for name, value in super().objective(logps, batch).items()}

    assert method_class("dpo").takes_margin and not Half.takes_margin


def test_method_class_by_import_path():
    assert method_class("expo_bench.methods.expo_compositional:EXPOCompositional") is EXPOCompositional
    assert method_class("expo_bench.methods.expo_compositional.EXPOCompositional") is EXPOCompositional
    assert method_class("expo_compositional") is EXPOCompositional


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("dpoo", "unknown method 'dpoo' (did you mean 'dpo'?)"),
        ("expo_compositonal", "did you mean 'expo_compositional'?"),
        ("no_such_module:Method", "cannot import method"),
        ("expo_bench.methods.dpo:Nope", "cannot import method"),
        ("torch.nn:Linear", "not a subclass"),
    ],
)
def test_method_class_rejects_unknown(name, message):
    with pytest.raises(UnknownMethodError, match=re.escape(message)):
        method_class(name)
