"""Applying a step: x <- param_scale * x + sum_i c_i z_i for a step's (seed, coefficient) pairs, or the sign
step, with seeded stochastic rounding for bf16/fp16 parameters. Training and replay call the same function,
so both produce the same bits (docs/method.md sections 6 and 7).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .counter_noise import update_jobs
from .directions import DirectionSpace
from .jobs import Job
from .lowrank import add_lowrank, lowrank_sum
from .noise import chunk_bounds, fill_chunk, mix_seed
from .rounding import HALF_DTYPES, round_rows_into, stochastic_round


def rounding_generator(space: DirectionSpace, step: int, index: int, chunk: int,
                       device: torch.device) -> torch.Generator:
    """The generator of the stochastic rounding of chunk ``chunk`` of parameter ``index`` at ``step``.

    Seeded with ``mix_seed(run_seed, step, index, chunk)``: a function of the run and the
    element's position only, so every replica, every thread count and every replay rounds
    each element the same way.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(mix_seed(space.run_seed, step, index, chunk))
    return gen


def apply_update(space: DirectionSpace, pairs: Sequence[tuple[int, float]], param_scale: float = 1.0,
                 step: int | None = None, sign_step: float | None = None) -> None:
    """x <- param_scale * x + sum_i c_i z_i (or, with ``sign_step``, x <- param_scale * x - a sign(sum_i c_i z_i)).

    In place, in a fixed order. Every element gets its parameter's ``param_scale`` first (1.0 for
    parameters ``space.decay_exempt`` spares), then the pairs in the given order; replay uses the
    same function, so training and replay produce the same bits.
    Chunked noise is added chunk by chunk (one chunk of noise per thread at a time).
    A low-rank parameter takes all directions in one product (``lowrank.add_lowrank``),
    which costs N r (m + n) noise numbers and one GEMM; with lazy V, whose V every direction
    shares, the U's are summed first (one rank-r product). The small parameters of low-rank
    directions take the sum of their directions' noise in one addition.

    Sign updates (ZO-signSGD): with ``sign_step = a`` the arithmetic above runs on a float32 zero
    tensor ``g`` (per chunk, or per whole parameter), and the parameter then gets ``-a * sign(g)``
    once (``sign(0) = 0``); ``g`` depends only on the pairs and their order, so every replica and
    replay take the same signs.

    Rounding: a float32 (or float64) parameter is updated in its own dtype, each addition
    rounded to nearest. A bf16 or fp16 parameter is updated in a float32 copy of each chunk
    (of the whole tensor for low-rank, table and non-contiguous parameters) and rounded back
    once, stochastically (``rounding.stochastic_round``), with the generator
    ``rounding_generator(space, step, index, chunk)`` (chunk 0 for a whole tensor): round to
    nearest would drop every update below half an ulp. A low-rank matrix is summed and rounded a block of
    rows at a time (``rounding.round_rows_into``), with the bits of the whole tensor's rounding.

    Counter-based noise (``space.counter_based``): each weight takes the whole step in one pass
    (counter_noise.update_jobs; a fused kernel on an accelerator), in float32, with the bf16 rounding's bits
    from the key ``mix_seed(run_seed, step, index)``.

    Args:
        space: the selected parameters.
        pairs: (seed, coefficient) per direction; zero coefficients are skipped.
        param_scale: multiplier on x first (weight decay), 1.0 for none.
        step: the step the pairs belong to (needed for lazy V and for bf16/fp16 parameters).
        sign_step: None for the linear update; ``a >= 0`` for the sign update above.

    Raises:
        ValueError: ``step`` is None while bf16/fp16 parameters are to be updated (or lazy V needs it).
    """
    active = [(s, c) for s, c in pairs if c != 0.0]
    if not active and param_scale == 1.0:
        return
    if step is None and any(p.dtype in HALF_DTYPES for p in space.params):
        raise ValueError("bf16/fp16 parameters are updated with seeded stochastic rounding, which needs the "
                         "step of the update. Fix: pass step= to apply_update")
    signed = sign_step is not None and bool(active)  # no direction: sign(0) = 0, only the decay remains
    # Sphere scales need every parameter's noise: computed here, before the jobs that use them.
    scales = {s: space._sphere(s) for s, _ in active} if space.distribution == "sphere" else {}
    streams = space.factor_streams
    u_sum = w_sum = None
    if active and (streams.layout or streams.vector_layout):  # every direction's stream, before the jobs read
        streams.prefetch([s for s, _ in active], step)
        # Summed over directions on the flat streams: a shared (lazy) V makes every matrix's update
        # (sum_i c_i U_i) V^T, and the small parameters take one addition each.
        u_sum, w_sum = streams.combined(active, step)

    def matrix_factors(i: int, device: torch.device) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
        # (coefficient, U, V) of low-rank matrix i for the step: one summed U with a shared (lazy) V, else a pair each.
        if u_sum is not None:  # V shared by every pair: take the first's
            return [(1.0, streams.slice_u(u_sum, i, device), space.factors(active[0][0], i, step)[1])]
        return [(c, *space.factors(s, i, step)) for s, c in active]

    def finish(target: torch.Tensor, g: torch.Tensor | None) -> None:
        if g is not None:  # the sign update: -a sign(g), one addition after the decay
            target.add_(torch.sign(g).to(target.dtype), alpha=-float(sign_step))  # type: ignore[arg-type]

    jobs: list[Job] = []
    for i, p in enumerate(space.params):
        half = p.dtype in HALF_DTYPES
        scale_i = space.scale_of(i, param_scale)
        if space.counter_based:  # every pair, the decay, the sign and the rounding in one pass over the weight
            rounding_key = mix_seed(space.run_seed, step, i) if step is not None else 0
            sign = sign_step if signed else None
            if space._counter(i):
                jobs.extend(update_jobs(p.detach(), [(mix_seed(s, i), c) for s, c in active], scale_i, sign,
                                        rounding_key))
                continue

            def fused_lowrank(i: int = i, p: torch.Tensor = p, scale_i: float = scale_i, sign: float | None = sign,
                              rounding_key: int = rounding_key) -> None:
                # The low-rank product (or the small parameter's factor-stream noise) in float32, then one pass.
                delta = None
                if active and space.is_lowrank(i):
                    delta = lowrank_sum(matrix_factors(i, p.device))
                elif active and w_sum is not None:
                    delta = streams.slice_w(w_sum, i, p.device)
                for _, run in update_jobs(p.detach(), [], scale_i, sign, rounding_key, delta):
                    run()
            jobs.append((p.numel(), fused_lowrank))
            continue
        if half and active and not signed and space.is_lowrank(i) and step is not None:
            def lowrank_rows(i: int = i, p: torch.Tensor = p, scale_i: float = scale_i) -> None:
                # The same float32 arithmetic as ``whole`` below, a block of rows at a time (row r of U V^T needs
                # row r of U only), rounded as it is made: the same bits, in cache.
                factors = matrix_factors(i, p.device)
                weight = p.detach()

                def rows(first: int, end: int) -> torch.Tensor:
                    target = weight[first:end].float()
                    if scale_i != 1.0:
                        target.mul_(scale_i)
                    add_lowrank(target, [(c, u[first:end], v) for c, u, v in factors])
                    return target
                round_rows_into(weight, rows, rounding_generator(space, step, i, 0, p.device))
            jobs.append((p.numel(), lowrank_rows))
            continue
        if not space._chunked(i):
            def whole(i: int = i, p: torch.Tensor = p, half: bool = half, scale_i: float = scale_i) -> None:
                target = p.detach().float() if half else p  # half: a float32 copy, rounded once at the end
                if scale_i != 1.0:
                    target.mul_(scale_i)
                g = torch.zeros(p.shape, dtype=torch.float32, device=p.device) if signed else None
                sink = g if g is not None else target  # the sign update sums the directions apart first
                if space.is_lowrank(i):
                    add_lowrank(sink, matrix_factors(i, p.device))
                elif w_sum is not None and space._in_stream(i):
                    sink.add_(streams.slice_w(w_sum, i, p.device).view(p.shape).to(sink.dtype))
                else:
                    for s, c in active:
                        sink.add_(space.noise(s, i, step).to(sink.dtype), alpha=c)
                finish(target, g)
                if half:
                    assert step is not None
                    p.copy_(stochastic_round(target, p.dtype, rounding_generator(space, step, i, 0, p.device)))
            jobs.append((p.numel(), whole))
            continue
        flat = p.detach().view(-1)
        for k, (lo, hi) in enumerate(chunk_bounds(p.numel(), p.device)):
            def part(i: int = i, k: int = k, segment: torch.Tensor = flat[lo:hi], half: bool = half,
                     scale_i: float = scale_i) -> None:
                target = segment.float() if half else segment  # half: a float32 copy, rounded once at the end
                if scale_i != 1.0:
                    target.mul_(scale_i)
                buffer = torch.empty(segment.numel(), dtype=torch.float32, device=segment.device)
                g = torch.zeros(segment.numel(), dtype=torch.float32, device=segment.device) if signed else None
                sink = g if g is not None else target
                for s, c in active:
                    z = fill_chunk(buffer, mix_seed(s, i), k, space._stream())
                    if scales:
                        z.mul_(scales[s])
                    sink.add_(z.to(sink.dtype), alpha=c)
                finish(target, g)
                if half:
                    assert step is not None
                    gen = rounding_generator(space, step, i, k, segment.device)
                    segment.copy_(stochastic_round(target, segment.dtype, gen))
            jobs.append((hi - lo, part))
    space.run_jobs(jobs)
    streams.trim()  # the update's prefetched streams are not needed any more
