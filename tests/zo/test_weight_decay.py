"""optimizer.weight_decay_exempt: which parameters decay, for the zeroth-order rules and the first-order references."""

from __future__ import annotations

import pytest
import torch

from conftest import TinyLM
from ray_s2p.config import ConfigError, OptimizerConfig, RunConfig
from ray_s2p.distributed.engine import make_first_order
from ray_s2p.zo.directions import DirectionSpace
from ray_s2p.zo.optimizer import ZerothOrderOptimizer, optimizer_config
from ray_s2p.zo.space import select_parameters
from ray_s2p.zo.update import apply_update
from ray_s2p.zo.weight_decay import decay_exempt

TINY_EXEMPT = {"fc1.bias", "fc2.bias", "norm.weight", "norm.bias"}  # TinyLM: emb, fc1, fc2, norm


class RMSNorm(torch.nn.Module):
    """A norm module as Llama-style code spells it (its own class, not torch's)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(width))


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4, bias=False)
        self.input_layernorm = RMSNorm(4)
        self.gn = torch.nn.GroupNorm(2, 4)
        self.attn = torch.nn.MultiheadAttention(4, 1)
        self.final_layer_norm_scale = torch.nn.Parameter(torch.ones(4))  # MeZO's name rule, on a parent


def test_biases_and_norm_parameters_are_spared_by_default():
    model = TinyLM()
    names, _ = select_parameters(model)
    flags = dict(zip(names, decay_exempt(model, names)))
    assert {n for n, f in flags.items() if f} == TINY_EXEMPT
    assert not any(decay_exempt(model, names, "none"))
    block = Block()
    names = [n for n, _ in block.named_parameters()]
    spared = {n for n, f in zip(names, decay_exempt(block, names)) if f}
    assert spared == {"input_layernorm.weight", "gn.weight", "gn.bias", "attn.in_proj_bias", "attn.out_proj.bias",
                      "final_layer_norm_scale"}  # decayed: proj.weight, attn.in_proj_weight, attn.out_proj.weight
    with pytest.raises(ValueError, match="weight_decay_exempt.*Fix: use bias_norm or none"):
        decay_exempt(model, names, "all")


@pytest.mark.parametrize("rule, decayed", [("bias_norm", {"emb.weight", "fc1.weight", "fc2.weight"}),
                                           ("none", {"emb.weight", "fc1.weight", "fc2.weight"} | TINY_EXEMPT)])
def test_the_update_decays_only_what_the_rule_leaves(rule, decayed):
    model = TinyLM()
    names, params = select_parameters(model)
    space = DirectionSpace(names, params, "gaussian", decay_exempt=decay_exempt(model, names, rule))
    start = {n: p.detach().clone() for n, p in zip(names, params)}
    apply_update(space, [(3, 0.0)], param_scale=0.5)  # decay only: no direction moves
    for n, p in zip(names, params):
        expected = start[n] * 0.5 if n in decayed else start[n]
        assert torch.equal(p.detach(), expected), n


def test_zeroth_order_rule_decays_weights_and_spares_biases_through_the_optimizer():
    # MeZO with a zero gradient estimate (a constant loss): only the decay moves, weights by 1 - lr wd.
    model = TinyLM()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = ZerothOrderOptimizer(model, optimizer_config(name="mezo", lr=0.1, rho=1e-3, weight_decay=2.0), seed=0)
    record = opt.step(lambda: torch.tensor(1.0))
    assert record.decision.coefficients == (0.0,) and record.decision.param_scale == pytest.approx(0.8)
    for n, p in model.named_parameters():
        factor = 1.0 if n in TINY_EXEMPT else 0.8
        torch.testing.assert_close(p.detach(), start[n] * factor, rtol=0, atol=0)


@pytest.mark.parametrize("name, factor", [("adamw", 1 - 0.1 * 0.5), ("sgd", None)])
def test_first_order_references_spare_the_same_parameters(name, factor):
    model = TinyLM()
    names, params = select_parameters(model)
    config = RunConfig.from_dict({"optimizer": {"name": name, "lr": 0.1, "weight_decay": 0.5}})
    opt = make_first_order(config, params, decay_exempt(model, names))
    start = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)  # a zero gradient: what moves is weight decay alone
    opt.step()
    for n, p, x0 in zip(names, params, start):
        if n in TINY_EXEMPT:
            assert torch.equal(p.detach(), x0), n
        elif factor is not None:  # AdamW: decoupled, x *= 1 - lr wd; its Adam step of a zero gradient is 0
            torch.testing.assert_close(p.detach(), x0 * factor)
        else:  # SGD: coupled L2, x -= lr wd x
            torch.testing.assert_close(p.detach(), x0 - 0.1 * 0.5 * x0)


def test_the_config_names_the_field_and_the_fix():
    with pytest.raises(ConfigError, match=r"optimizer.weight_decay_exempt.*Fix: use bias_norm .* or none"):
        OptimizerConfig(weight_decay_exempt="biases")
    assert OptimizerConfig().weight_decay_exempt == "bias_norm"


def test_the_exemption_enters_the_fingerprint_only_with_weight_decay():
    from ray_s2p.distributed.checkpoint import config_fingerprint

    plain = RunConfig().to_dict()
    before = {**plain, "optimizer": {k: v for k, v in plain["optimizer"].items() if k != "weight_decay_exempt"}}
    assert config_fingerprint(plain) == config_fingerprint(before)  # older runs without decay still resume
    decayed = RunConfig().replace({"optimizer.weight_decay": 0.1})
    spared, everything = decayed.to_dict(), decayed.replace({"optimizer.weight_decay_exempt": "none"}).to_dict()
    assert config_fingerprint(spared) != config_fingerprint(everything)
