"""The plain PyTorch loop of the README, runnable: ``ZerothOrderOptimizer`` on a model and data of your own.

    python jobs/plain_loop.py                      # search eta briefly on validation, then train
    python jobs/plain_loop.py --eta 30 --steps 500

A 2-layer GPT-2 (width 64, built from a config, no download) learns the bytes of Rotten Tomatoes review
snippets with VS2P, forward passes only. Three disjoint sets of 64-byte sequences: train, validation (what the
step-size search reads) and test (what the last line reports, seen by nothing else).

Choosing eta: VS2P's step is eta times a loss difference divided by a running scale of it (docs/method.md), so
the right eta depends on the model and the loss, not on the learning rates a first-order optimizer would
take. ``--eta auto`` (the default) runs ``--search-steps`` steps from the same start for each eta in
``--grid`` and keeps the one with the lowest validation loss: a few hundred forward passes per candidate
tell a step that is too small (the loss barely moves) from one that is too large (it moves and comes back).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ray_s2p import ZerothOrderOptimizer, optimizer_config  # noqa: E402
from ray_s2p.data.sources import load_source  # noqa: E402

SEQUENCE = 64
BATCH = 16
HELD_OUT = 128  # sequences in each of validation and test


def byte_sequences(snippets: int = 4000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train, validation and test sequences of SEQUENCE bytes from the review snippets (disjoint)."""
    text = " ".join(load_source("rotten_tomatoes").rows["text"][:snippets]).encode()
    usable = len(text) // SEQUENCE * SEQUENCE
    data = torch.tensor(list(text[:usable]), dtype=torch.long).view(-1, SEQUENCE)
    return data[: -2 * HELD_OUT], data[-2 * HELD_OUT: -HELD_OUT], data[-HELD_OUT:]


def build_model(seed: int = 0) -> torch.nn.Module:
    """A 2-layer GPT-2 over bytes, its initial weights fixed by ``seed``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)  # transformers initialises from the global generator
    config = GPT2Config(vocab_size=256, n_positions=SEQUENCE, n_embd=64, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def held_out_loss(model: torch.nn.Module, data: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(input_ids=data, labels=data).loss)


def train(model: torch.nn.Module, data: torch.Tensor, eta: float, steps: int, seed: int = 0,
          log: Callable[[str], None] | None = None) -> torch.nn.Module:
    """``steps`` VS2P steps on batches of ``data`` drawn with ``seed``: the README's loop."""
    opt = ZerothOrderOptimizer(model, optimizer_config(name="vs2p", eta=eta, rho=1e-3), seed=seed, total_steps=steps)
    batches = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = data[torch.randint(len(data), (BATCH,), generator=batches)]
        # forward passes only; step() calls the closure before this iteration ends
        record = opt.step(lambda: model(input_ids=x, labels=x).loss)  # noqa: B023
        if log is not None and record.step % 50 == 0:
            log(f"step {record.step}: loss {record.loss:.4f} (f(x+rho z), f(x-rho z) = "
                f"{record.losses[0][0]:.4f}, {record.losses[0][1]:.4f}; coefficient "
                f"{record.decision.coefficients[0]:+.4g})")
    return model


def search_eta(model: torch.nn.Module, data: torch.Tensor, validation: torch.Tensor, grid: list[float],
               steps: int, log: Callable[[str], None]) -> float:
    """The eta of ``grid`` with the lowest validation loss after ``steps`` steps from ``model``'s weights."""
    scores = {}
    for eta in grid:
        scores[eta] = held_out_loss(train(copy.deepcopy(model), data, eta, steps), validation)
        log(f"eta {eta:g}: validation loss {scores[eta]:.4f} after {steps} steps")
    return min(scores, key=scores.__getitem__)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--eta", default="auto", help="VS2P's eta, or auto: search --grid first (default)")
    parser.add_argument("--grid", default="3,10,30,100", help="the etas --eta auto tries (default 3,10,30,100)")
    parser.add_argument("--search-steps", type=int, default=50, help="steps per eta in the search (default 50)")
    args = parser.parse_args(argv)
    train_data, validation, test = byte_sequences()
    model = build_model()
    start = held_out_loss(model, test)
    if args.eta == "auto":
        eta = search_eta(model, train_data, validation, [float(v) for v in args.grid.split(",")], args.search_steps,
                         print)
    else:
        eta = float(args.eta)
    train(model, train_data, eta, args.steps, log=print)
    end = held_out_loss(model, test)
    print(f"eta {eta:g}, {args.steps} steps: test loss {start:.4f} -> {end:.4f} (nats per byte)")
    return {"eta": eta, "start": start, "end": end}


if __name__ == "__main__":
    main()
