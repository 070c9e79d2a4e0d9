"""ZerothOrderOptimizer runs its probes in eval mode and gives every module its own mode back."""

from __future__ import annotations

import torch

from ray_s2p.zo.optimizer import ZerothOrderOptimizer, optimizer_config


def _model() -> torch.nn.Module:
    torch.manual_seed(0)  # the test's own model; the optimizer never touches the global RNG
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.5), torch.nn.BatchNorm1d(16),
                               torch.nn.Linear(16, 2))


def test_probes_see_eval_mode_and_modes_come_back():
    model = _model()
    model.train()
    model[2].eval()  # a frozen norm the user keeps in eval mode must stay so
    x, y = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 2
    seen = []

    def closure() -> torch.Tensor:
        seen.append(tuple(m.training for m in model.modules()))
        return torch.nn.functional.cross_entropy(model(x), y)

    stats = model[2].running_mean.clone()
    opt = ZerothOrderOptimizer(model, optimizer_config(name="mezo", lr=1e-3, rho=1e-3), seed=3)
    record = opt.step(closure)
    assert len(seen) == 2 and all(not any(flags) for flags in seen)  # every module in eval for both probes
    assert model.training and model[0].training and model[1].training and not model[2].training
    assert torch.equal(model[2].running_mean, stats)  # probes do not update batch-norm statistics
    # In eval mode the two probes differ only by the direction: with dropout active at p = 0.5, the
    # same probe repeated would differ by far more than the 1e-3 perturbation does.
    plus, minus = record.losses[0]
    assert abs(plus - minus) < 0.05
    model.eval()
    with torch.no_grad():
        center = float(torch.nn.functional.cross_entropy(model(x), y))
    assert abs((plus + minus) / 2 - center) < 0.01  # the probes' mean is the eval loss near x
