"""Shared parameters under the hooks mechanism: tied into two modules, read outside their module, or aliased."""

from __future__ import annotations

import pytest
import torch

from ray_s2p import optimizer_config
from ray_s2p.distributed.digest import model_digest
from ray_s2p.zo.directions import DirectionSpace
from ray_s2p.zo.optimizer import ZerothOrderOptimizer
from ray_s2p.zo.probes import Prober
from ray_s2p.zo.space import select_parameters

IDS = torch.randint(0, 40, (4, 6), generator=torch.Generator().manual_seed(1))


class TinyTiedLM(torch.nn.Module):
    """Embedding -> Linear -> tanh -> logits over the vocabulary through the embedding matrix.

    ``mode`` says how the logits read the embedding: ``tied`` through a head module holding the same
    nn.Parameter (how language models tie them), ``functional`` as ``h @ emb.weight.T`` in this forward,
    ``aliased`` through a head whose separate nn.Parameter shares the embedding's memory.
    """

    def __init__(self, mode: str) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.mode = mode
        self.emb = torch.nn.Embedding(40, 12)
        self.fc = torch.nn.Linear(12, 12)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        if mode != "functional":
            self.head = torch.nn.Linear(12, 40, bias=False)
            self.head.weight = (self.emb.weight if mode == "tied"
                                else torch.nn.Parameter(self.emb.weight.data))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc(self.emb(ids)))
        logits = h @ self.emb.weight.T if self.mode == "functional" else self.head(h)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())


def space_of(model: torch.nn.Module, distribution: str) -> DirectionSpace:
    names, params = select_parameters(model)
    return DirectionSpace(names, params, distribution)


def perturbed_by_hand(model: TinyTiedLM, space: DirectionSpace, seed: int, radius: float) -> float:
    """The loss at x + radius z with z written into a copy's parameters (the definition of a probe)."""
    import copy
    other = copy.deepcopy(model)
    with torch.no_grad():
        for (name, p) in other.named_parameters():
            i = space.names.index(name)
            p.add_(space.noise(seed, i).to(p.dtype), alpha=radius)
        return float(other(IDS))


@pytest.mark.parametrize("distribution", ["gaussian", "lowrank"])
def test_a_tied_embedding_is_perturbed_in_both_modules(distribution):
    model = TinyTiedLM("tied")
    space = space_of(model, distribution)
    assert space.names == ["emb.weight", "fc.weight", "fc.bias"]  # the tied weight is one parameter
    prober = Prober(model, space, "hooks")
    assert prober.tied == {"emb.weight": ["emb", "head"]}
    before = model_digest(model)
    hooks = prober.evaluate(lambda: model(IDS), 7, 0.05)
    assert prober.whole_forward == []  # both owners run: no whole-forward swap needed
    swap = Prober(model, space, "swap").evaluate(lambda: model(IDS), 7, 0.05)
    assert hooks == pytest.approx(swap, rel=1e-6)
    assert hooks == pytest.approx(perturbed_by_hand(model, space, 7, 0.05), rel=1e-5)
    with torch.no_grad():
        assert abs(hooks - float(model(IDS))) > 1e-3
    assert model_digest(model) == before


@pytest.mark.parametrize("distribution", ["gaussian", "lowrank"])
def test_a_weight_read_outside_its_module_is_perturbed_there_too(distribution):
    model = TinyTiedLM("functional")
    space = space_of(model, distribution)
    prober = Prober(model, space, "hooks")
    hooks = prober.evaluate(lambda: model(IDS), 7, 0.05)
    assert prober.whole_forward == ["emb.weight"]  # found on the first probe: emb runs, yet emb.weight is read here
    assert hooks == pytest.approx(perturbed_by_hand(model, space, 7, 0.05), rel=1e-5)
    assert hooks == Prober(model, space, "swap").evaluate(lambda: model(IDS), 7, 0.05)
    # What the hooks did before the first-probe check: perturbed inside emb only; a visibly different loss.
    blind = Prober(model, space, "hooks")
    blind._eager = set()
    assert abs(blind.evaluate(lambda: model(IDS), 7, 0.05) - hooks) > 1e-4


def test_training_a_tied_model_with_hooks_equals_training_it_with_swap():
    digests = []
    for mechanism in ("hooks", "swap"):
        model = TinyTiedLM("functional")
        opt = ZerothOrderOptimizer(model, optimizer_config(name="vs2p", eta=0.5, rho=1e-2), seed=3,
                                   total_steps=8, mechanism=mechanism)
        losses = [opt.step(lambda: model(IDS)).loss for _ in range(8)]
        digests.append(model_digest(model))
    assert digests[0] == digests[1]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("mechanism", ["hooks", "swap", "naive"])
def test_separate_parameters_sharing_memory_are_refused(mechanism):
    model = TinyTiedLM("aliased")
    with pytest.raises(ValueError, match="'emb.weight' and 'head.weight' are separate nn.Parameter objects "
                                         "sharing memory.*Fix: tie them as one parameter"):
        Prober(model, space_of(model, "gaussian"), mechanism)
