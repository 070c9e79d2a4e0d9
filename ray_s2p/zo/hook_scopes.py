"""Where the ``hooks`` mechanism swaps its perturbed copies: the smallest modules, merged upwards while that holds
no more memory than the largest single module's copies.

Hooks on every leaf module (a Linear, a LayerNorm) make one round of noise jobs per leaf: a 384 x 384 weight is
one noise chunk, so one job, and a second noise thread has nothing to do while it runs. Hooking a parent instead
(an attention block's query, key and value) draws all of its children's noise in one round, on every thread,
and costs one hook pair instead of several. The copies then live for the parent's forward, so a parent is
chosen only while its copies together are no larger than the largest single leaf's: the peak memory of a probe,
which that leaf reaches anyway, does not grow. Which module holds the hooks changes nothing else: every read of
a parameter happens inside its owner's forward, and so inside every ancestor's (reads elsewhere are found by
reads.py and swapped for the whole forward, as before).
"""

from __future__ import annotations

import torch


def _runs(module: torch.nn.Module) -> bool:
    # Containers (ModuleList, ModuleDict) have no forward of their own: hooks on them never fire.
    return type(module).forward is not torch.nn.Module.forward


def merge_scopes(model: torch.nn.Module, swapped_of: dict[torch.nn.Module, list[int]],
                 sizes: list[int]) -> dict[torch.nn.Module, list[int]]:
    """The modules whose hooks swap each parameter, merged upwards within the memory of the largest leaf.

    Args:
        model: the root module (never chosen itself: a loss may call its children directly).
        swapped_of: the parameters (space indices) each module owns directly and swaps whole.
        sizes: the bytes of each parameter's perturbed copy, by space index.

    Returns:
        module -> the indices its hooks swap, in ``model.modules()`` order. Every index of ``swapped_of`` is
        swapped by the highest module that contains one of its owners and whose subtree's copies take at most
        the largest single ``swapped_of`` entry's bytes; modules owning nothing and above every such module
        keep their own entries.
    """
    budget = max((sum(sizes[i] for i in indices) for indices in swapped_of.values()), default=0)
    below: dict[torch.nn.Module, set[int]] = {}

    def collect(module: torch.nn.Module) -> set[int]:
        if module not in below:
            found = set(swapped_of.get(module, ()))
            for child in module.children():
                found |= collect(child)
            below[module] = found
        return below[module]

    collect(model)
    chosen: dict[torch.nn.Module, list[int]] = {}

    def assign(module: torch.nn.Module) -> None:
        indices = below[module]
        if not indices or module in chosen:
            return
        if module is not model and _runs(module) and sum(sizes[i] for i in indices) <= budget:
            chosen[module] = sorted(indices)
            return
        if swapped_of.get(module):
            chosen[module] = list(swapped_of[module])
        for child in module.children():
            assign(child)

    assign(model)
    order = {m: k for k, m in enumerate(model.modules())}
    return dict(sorted(chosen.items(), key=lambda item: order[item[0]]))
