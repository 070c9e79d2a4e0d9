"""Which modules hold the ``hooks`` mechanism's swaps: leaves merged into parents within one leaf's memory."""

from __future__ import annotations

import torch

from ray_s2p.distributed.digest import model_digest
from ray_s2p.zo.directions import DirectionSpace
from ray_s2p.zo.hook_scopes import merge_scopes
from ray_s2p.zo.probes import Prober
from ray_s2p.zo.space import select_parameters


class Attention(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.query, self.key, self.value = (torch.nn.Linear(width, width) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.query(x) @ self.key(x).transpose(-1, -2), dim=-1)
        return weights @ self.value(x)


class Block(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.attention = Attention(width)
        self.norm = torch.nn.LayerNorm(width)
        self.up = torch.nn.Linear(width, 4 * width)
        self.down = torch.nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x + self.attention(x))
        return x + self.down(torch.tanh(self.up(x)))


class Stack(torch.nn.Module):
    def __init__(self, width: int = 8, depth: int = 2) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block(width) for _ in range(depth))
        self.head = torch.nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=1))


def test_leaves_merge_into_parents_whose_copies_fit_in_the_largest_leaf():
    model = Stack()
    names, params = select_parameters(model)
    index = {id(p): i for i, p in enumerate(params)}
    swapped_of = {m: [index[id(p)] for p in m._parameters.values()] for m in model.modules() if m._parameters}
    sizes = [p.numel() * p.element_size() for p in params]
    scopes = merge_scopes(model, swapped_of, sizes)
    chosen = {name: scopes[m] for name, m in model.named_modules() if m in scopes}
    # up and down are the largest leaves (8 x 32 + 32 and 32 x 8 + 8 floats); the attention's three
    # 8 x 8 + 8 layers (216 floats) fit in that, the whole block (720) does not.
    assert set(chosen) == {f"blocks.{b}.{part}" for b in (0, 1) for part in ("attention", "norm", "up", "down")} | {
        "head"}
    budget = max(sum(sizes[i] for i in v) for v in swapped_of.values())
    assert all(sum(sizes[i] for i in v) <= budget for v in chosen.values())
    assert sorted(i for v in chosen.values() for i in v) == list(range(len(params))), "each parameter once"
    # With a large head, whole blocks fit, but their ModuleList never: a container's hooks would not fire.
    head = set(swapped_of[model.head])
    scopes = merge_scopes(model, swapped_of, [10**6 if i in head else 1 for i in range(len(params))])
    assert set(scopes) == {model.blocks[0], model.blocks[1], model.head}

def test_merged_hooks_give_the_swap_losses_bit_for_bit_and_leave_weights_intact():
    torch.manual_seed(0)
    model = Stack(width=16)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    fn = lambda: model(x).pow(2).mean()  # noqa: E731
    space = DirectionSpace(*select_parameters(model), "gaussian", threads=2)
    hooks, swap = Prober(model, space, "hooks"), Prober(model, space, "swap")
    assert any(isinstance(m, Attention) for m, swapped, _ in hooks._owners if swapped)
    before = model_digest(model)
    for seed in (3, 4, 5):
        assert hooks.evaluate(fn, seed, 0.05) == swap.evaluate(fn, seed, 0.05)
    assert hooks.whole_forward == []
    assert model_digest(model) == before
    # Merging never holds more at once than the largest single module (here up or down: 16 x 64 + 64 floats).
    assert hooks.held_copy_bytes == (16 * 64 + 64) * 4
    assert swap.held_copy_bytes == sum(p.numel() * 4 for p in model.parameters())
