"""Step sizes that grow with Q, the directions a step evaluates: the factor, each rule's formula, the config.

Losses are chosen so that gamma = (f+ - f-) / (2 rho) is exact in binary (rho = 0.5), and every
factor below is a power of two or 1, so the expected values are exact products of the unscaled ones.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import TinyLM
from ray_s2p.config import ConfigError, OptimizerConfig, RunConfig
from ray_s2p.config_history import saved_config, trajectory_dict
from ray_s2p.distributed.checkpoint import config_fingerprint
from ray_s2p.zo.optimizer import ZerothOrderOptimizer, optimizer_config
from ray_s2p.zo.rules import StepScaling, build_rule

NAN = float("nan")
RHO = 0.5
# Every zeroth-order rule of the harness, with settings that make each move non-zero.
RULES = {
    "vs2p": {"name": "vs2p", "eta": 1.0},
    "vs2p_argmin": {"name": "vs2p", "eta": 1.0, "sign_trick": False},
    "mezo": {"name": "mezo", "lr": 0.25},
    "zo_sign": {"name": "zo_sign", "lr": 0.25},
    "s2p_opt1": {"name": "s2p", "step_size_option": 1, "lr": 0.25},
    "s2p_opt1_argmin": {"name": "s2p", "step_size_option": 1, "lr": 0.25, "sign_trick": False},
    "s2p_opt2": {"name": "s2p", "step_size_option": 2, "eta": 0.25},
    "s2p_opt4": {"name": "s2p", "step_size_option": 4},
    "stp": {"name": "stp", "lr": 0.25},
    "random_search": {"name": "random_search", "lr": 0.25},
    "zo_signsgd": {"name": "zo_signsgd", "lr": 0.25},
}


def rule(scaling: str, tuned: int = 1, **fields):
    cfg = OptimizerConfig(**{"rho": RHO, "weight_decay": 0.5, **fields, "step_scaling": scaling,
                             "tuned_directions": tuned})
    return build_rule(cfg, 100)


def losses_for(r, q: int) -> list[list[float]]:
    """A loss table of q directions for rule r: two-point rows, three-point rows for STP, and four-column
    rows (first round, then the follow-up at +-a_k) for the argmin variants."""
    width = len(r.radii(r.init(), 1))
    rows = []
    for i in range(q):
        g = 0.25 * (i + 1) * (-1) ** i  # distinct gammas of both signs
        two = [1.0 + RHO * g, 1.0 - RHO * g]
        row = [2.0] + two if width == 3 else two
        if getattr(r, "argmin_followup", False):
            row += [1.0 - 0.125 * (-1) ** i, 1.0 + 0.125 * (-1) ** i]
        rows.append(row)
    return rows


def test_the_factor_is_q_over_q_tuned_its_root_or_one():
    assert StepScaling("linear", 1).factor(16) == 16.0
    assert StepScaling("linear", 4).factor(2) == 0.5
    assert StepScaling("sqrt", 1).factor(16) == 4.0
    assert StepScaling("sqrt", 2).factor(8) == 2.0
    assert StepScaling("none", 1).factor(64) == 1.0
    for kind in ("linear", "sqrt", "none"):
        assert StepScaling(kind, 8).factor(8) == 1.0  # exactly: a config at its tuned Q keeps its numbers
    with pytest.raises(ValueError, match="at least one direction"):
        StepScaling("linear").factor(0)
    with pytest.raises(ValueError, match="optimizer.step_scaling"):
        StepScaling("quadratic")


@pytest.mark.parametrize("name", sorted(RULES))
def test_linear_scaling_multiplies_every_rules_move_and_its_weight_decay(name):
    plain, scaled = rule("none", **RULES[name]), rule("linear", **RULES[name])
    table = losses_for(plain, 4)
    a, _ = plain.update(table, plain.init(), 1)
    b, _ = scaled.update(table, scaled.init(), 1)
    assert any(c != 0.0 for c in a.coefficients)
    if name == "zo_signsgd":
        # The coefficients are the estimate whose sign is taken: the step per coordinate grows instead.
        assert b.coefficients == a.coefficients and b.sign_step == 4 * a.sign_step == 1.0
    else:
        assert b.coefficients == tuple(4 * c for c in a.coefficients)
        assert b.sign_step is None
    lr = RULES[name].get("lr", 1e-3)
    assert a.param_scale == 1 - lr * 0.5 and b.param_scale == 1 - 4 * lr * 0.5
    assert b.gammas == a.gammas and b.skipped == a.skipped and b.sigma == a.sigma


@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("kind", ["linear", "sqrt"])
def test_at_its_tuned_q_a_rule_decides_bit_for_bit_as_the_plain_average(name, kind):
    plain, scaled = rule("none", **RULES[name]), rule(kind, tuned=3, **RULES[name])
    table = losses_for(plain, 3)
    assert scaled.update(table, scaled.init(), 1) == plain.update(table, plain.init(), 1)


def test_vs2p_with_linear_scaling_moves_each_direction_by_its_full_step():
    # eta 1, beta 1, rho 0.5, tau_a = tau_b = 3, warm-up abs_gamma: sigma is |gamma| on the first step,
    # so a = eta rho / (tau_b (1 + 1/tau_a)) = 0.5 / 4 = 0.125 per direction (see test_step_rules.py).
    # With Q = 2 and Q_t = 1 the average (/2) is scaled by 2: each direction moves its whole -a sign(gamma).
    r = rule("linear", name="vs2p", eta=1.0, weight_decay=0.0)
    decision, _ = r.update([[1.0, 1.0 - 2 * RHO * 0.25], [1.0, 1.0 - 2 * RHO * 0.25]], r.init(), 1)
    assert decision.step_sizes == (0.125, 0.125)
    assert decision.coefficients == (-0.125, -0.125)


def test_skipped_directions_leave_the_average_but_not_q():
    # Q = 4 evaluated, one with a non-finite loss: c_i = raw_i * s(4) / 3 for the three valid ones.
    plain, scaled = rule("none", name="mezo", lr=0.25), rule("linear", name="mezo", lr=0.25)
    table = losses_for(plain, 4)
    table[2] = [NAN, 1.0]
    a, _ = plain.update(table, plain.init(), 1)
    b, _ = scaled.update(table, scaled.init(), 1)
    assert a.skipped == b.skipped == (False, False, True, False)
    assert b.coefficients == tuple(4 * c for c in a.coefficients) and b.coefficients[2] == 0.0


def test_the_scaled_weight_decay_is_checked_for_the_planned_q():
    cfg = OptimizerConfig(name="mezo", lr=0.1, weight_decay=2.0)  # lr wd = 0.2: fine at Q = 1 ...
    build_rule(cfg, 10, directions=4)
    with pytest.raises(ValueError, match=r"step scaling 8 of 8 directions per step.*lower weight_decay"):
        build_rule(cfg, 10, directions=8)  # ... 1.6 at Q = 8 would flip the weights


def test_config_errors_name_the_key_and_the_fix():
    with pytest.raises(ConfigError, match=r"'optimizer.step_scaling'.*use linear"):
        RunConfig.from_dict({"optimizer": {"step_scaling": "cubic"}})
    with pytest.raises(ConfigError, match=r"'optimizer.tuned_directions'.*1 or more"):
        RunConfig.from_dict({"optimizer": {"tuned_directions": 0}})


def test_q_counts_direction_groups_times_directions():
    def q(**cluster):
        return RunConfig.from_dict({"optimizer": {"directions": 3}, "cluster": cluster}).directions_per_step
    assert q(replicas=4, mode="direction") == 12
    assert q(replicas=4, mode="data") == 3
    assert q(replicas=4, mode="hybrid", groups=2) == 6


def test_plain_optimizer_scales_with_its_directions():
    # ZO-signSGD with 2 directions and linear scaling: every coordinate moves by exactly 2 lr.
    model = TinyLM()
    ids = torch.randint(0, 50, (8, 5), generator=torch.Generator().manual_seed(1))
    start = [p.detach().clone() for p in model.parameters()]
    opt = ZerothOrderOptimizer(model, optimizer_config(name="zo_signsgd", lr=0.01, rho=1e-3, directions=2), seed=0)
    record = opt.step(lambda: model(ids).pow(2).mean())
    assert record.decision.sign_step == 0.02
    for p, x0 in zip(model.parameters(), start):
        torch.testing.assert_close((p.detach() - x0).abs(), torch.full_like(x0, 0.02), atol=1e-6, rtol=0)


def test_an_old_run_config_resumes_with_its_plain_average_and_its_old_fingerprint():
    old = RunConfig().to_dict()
    del old["optimizer"]["step_scaling"], old["optimizer"]["tuned_directions"]  # written before the keys existed
    cfg = saved_config(old)
    assert cfg.optimizer.step_scaling == "none"
    assert config_fingerprint(cfg.to_dict()) == config_fingerprint(old)
    linear = RunConfig()
    assert config_fingerprint(linear.to_dict()) != config_fingerprint(old)
    # A resume with another replica count keeps the fingerprint: the step is scaled for the new Q.
    assert config_fingerprint(linear.replace({"cluster.replicas": 8}).to_dict()) == config_fingerprint(linear.to_dict())


def test_result_fingerprints_drop_the_keys_only_where_they_change_nothing():
    at_tuned = RunConfig().replace({"cluster.replicas": 1})  # Q = 1 = tuned_directions
    assert "step_scaling" not in trajectory_dict(at_tuned)["optimizer"]
    assert "batch_scaling" not in trajectory_dict(at_tuned)["cluster"]
    scaled = RunConfig()  # Q = 2, factor 2
    assert trajectory_dict(scaled)["optimizer"]["step_scaling"] == "linear"
    strong = RunConfig().replace({"cluster.mode": "data", "cluster.batch_scaling": "strong"})
    assert trajectory_dict(strong)["cluster"]["batch_scaling"] == "strong"


def test_every_shipped_config_is_at_its_tuned_q():
    # Migration: each shipped config computes what it computed before step scaling existed (factor 1).
    from pathlib import Path

    from ray_s2p.config import DEFAULT_JOB, load_config
    repo = Path(__file__).resolve().parents[2]
    files = [DEFAULT_JOB, *sorted((repo / "jobs" / "configs").glob("*.yaml"))]
    assert len(files) >= 10
    for path in files:
        cfg = load_config(path)
        o = cfg.optimizer
        factor = StepScaling(o.step_scaling, o.tuned_directions).factor(cfg.directions_per_step)
        assert factor == 1.0, f"{path.name}: tuned_directions {o.tuned_directions}, Q {cfg.directions_per_step}"
    assert math.isclose(StepScaling("linear", 2).factor(16), 8.0)  # e.g. smoke.yaml on 16 replicas
