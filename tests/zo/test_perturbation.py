"""The perturbation engine: seeded noise, exact probes, deterministic updates."""

from __future__ import annotations

import math

import pytest
import torch

from ray_s2p.distributed.digest import model_digest
from ray_s2p.zo import noise
from ray_s2p.zo.directions import DirectionSpace, NoiseTable
from ray_s2p.zo.noise import mix_seed
from ray_s2p.zo.probes import Prober
from ray_s2p.zo.space import select_parameters
from ray_s2p.zo.update import apply_update


def mlp(seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def space_of(model: torch.nn.Module, distribution: str = "gaussian") -> DirectionSpace:
    names, params = select_parameters(model)
    table = NoiseTable(4096) if distribution == "table" else None
    return DirectionSpace(names, params, distribution, table)


X = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))


def loss_of(model: torch.nn.Module):
    return lambda: torch.nn.functional.cross_entropy(model(X), Y)


def test_mix_seed_is_stable_and_spread():
    assert mix_seed(1, 2) == mix_seed(1, 2)
    assert mix_seed(1, 2) != mix_seed(2, 1)
    assert 0 <= mix_seed(2**64 - 1, 5) < 2**63
    assert len({mix_seed(7, k) for k in range(1000)}) == 1000


def test_equal_shapes_get_distinct_noise():
    model = mlp()
    space = space_of(model)
    z1, z2 = space.noise(42, 0), space.noise(42, 2)  # the two 8x8 weights
    assert z1.shape == z2.shape == (8, 8)
    assert not torch.equal(z1, z2)
    assert torch.equal(space.noise(42, 0), z1), "noise must be regenerated identically"
    assert not torch.equal(space.noise(43, 0), z1)


def test_global_rng_untouched():
    model = mlp()  # nn.Linear's own init uses the global RNG; build first
    space = space_of(model)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    Prober(model, space).evaluate(loss_of(model), 5, 1e-2)
    apply_update(space, [(5, 0.1)])
    assert torch.equal(before, torch.random.get_rng_state())


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher", "sphere", "table"])
def test_distributions(distribution):
    model = mlp()
    space = space_of(model, distribution)
    z = torch.cat([space.noise(9, i).flatten() for i in range(len(space.params))])
    d = space.dim
    if distribution == "rademacher":
        assert set(z.unique().tolist()) == {-1.0, 1.0}
    if distribution == "sphere":
        assert math.isclose(float(z.double().norm()), math.sqrt(d), rel_tol=1e-5)
    if distribution in ("gaussian", "table"):
        assert abs(float(z.mean())) < 0.2 and 0.7 < float(z.std()) < 1.3


@pytest.mark.parametrize("mechanism", ["hooks", "swap"])
def test_probes_leave_parameters_bitwise_unchanged(mechanism):
    model = mlp()
    space = space_of(model)
    before = model_digest(model)
    prober = Prober(model, space, mechanism)
    for k in range(20):
        prober.evaluate(loss_of(model), mix_seed(0, k), 1e-3)
        prober.evaluate(loss_of(model), mix_seed(0, k), -1e-3)
    assert model_digest(model) == before


def test_naive_round_trip_drifts():
    # The reason for the swap mechanisms: x + t z - t z != x in floating point.
    model = mlp()
    space = space_of(model)
    before = model_digest(model)
    prober = Prober(model, space, "naive")
    for k in range(50):
        prober.evaluate(loss_of(model), mix_seed(0, k), 1e-3)
    assert model_digest(model) != before


def test_all_mechanisms_give_the_same_loss_as_explicit_perturbation():
    model = mlp()
    space = space_of(model)
    seed, t = 77, 1e-2
    reference = mlp()
    with torch.no_grad():
        for i, p in enumerate(reference.parameters()):
            p.copy_(space.perturbed(seed, i, t))
    expected = float(loss_of(reference)())
    for mechanism in ("hooks", "swap"):
        assert Prober(model, space, mechanism).evaluate(loss_of(model), seed, t) == expected
    assert Prober(model, space, "naive").evaluate(loss_of(model), seed, t) == pytest.approx(expected, abs=1e-6)


class OutsideUse(torch.nn.Module):
    """Reads a child's weight outside the child's forward (as some HF heads do)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.nn.Linear(8, 8)
        self.scale = torch.nn.Parameter(torch.ones(8))

    def forward(self, x):
        return x @ self.inner.weight.t() * self.scale


def test_hooks_fall_back_for_parameters_read_outside_their_module():
    torch.manual_seed(0)
    model = OutsideUse()
    space = space_of(model)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    fn = lambda: model(x).pow(2).mean()  # noqa: E731
    swap = Prober(model, space, "swap").evaluate(fn, 11, 0.1)
    hooks = Prober(model, space, "hooks").evaluate(fn, 11, 0.1)
    assert hooks == swap
    assert Prober(model, space, "hooks").evaluate(fn, 11, 0.1) != Prober(model, space, "hooks").evaluate(fn, 11, 0.0)


def test_tied_weights_are_perturbed_consistently():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    space = space_of(model)
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    fn = lambda: model(input_ids=ids, labels=ids).loss  # noqa: E731
    before = model_digest(model)
    hooks = Prober(model, space, "hooks").evaluate(fn, 5, 1e-2)
    swap = Prober(model, space, "swap").evaluate(fn, 5, 1e-2)
    assert hooks == pytest.approx(swap, abs=1e-6)
    assert model_digest(model) == before


def test_apply_update_is_deterministic_and_matches_formula():
    a, b = mlp(), mlp()
    sa, sb = space_of(a), space_of(b)
    pairs = [(mix_seed(1, 1, j), c) for j, c in enumerate([0.1, -0.05, 0.0])]
    expected = [p.detach().clone() * 0.99 + 0.1 * sa.noise(pairs[0][0], i) - 0.05 * sa.noise(pairs[1][0], i)
                for i, p in enumerate(sa.params)]
    apply_update(sa, pairs, param_scale=0.99)
    apply_update(sb, pairs, param_scale=0.99)
    assert model_digest(a) == model_digest(b)
    for p, e in zip(sa.params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-6)


def test_select_parameters_errors():
    model = mlp()
    with pytest.raises(ValueError, match="not in the model"):
        select_parameters(model, ["nope.weight"])
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        select_parameters(model)


def test_table_too_small_names_the_fix():
    model = mlp()
    names, params = select_parameters(model)
    space = DirectionSpace(names, params, "table", NoiseTable(1024))
    big = torch.nn.Linear(64, 64)
    space2 = DirectionSpace(["w"], [big.weight], "table", NoiseTable(1024))
    space.noise(1, 0)
    with pytest.raises(ValueError, match="perturbation.table_size"):
        space2.noise(1, 0)


@pytest.mark.parametrize("chunk", [None, 1000])
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher", "sphere", "table"])
def test_noise_threads_change_nothing_but_speed(distribution, chunk, monkeypatch):
    # Parameters are made and updated on several threads at once; each parameter's own noise and
    # arithmetic are unchanged, so probes and updates must equal the one-thread ones bit for bit.
    def wide(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256),
                                   torch.nn.Tanh(), torch.nn.Linear(256, 3))

    if chunk is not None:  # several chunks per weight, drawn on different threads
        monkeypatch.setattr(noise, "CHUNK", chunk)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    pairs = [(mix_seed(9, j), c) for j, c in enumerate([0.02, -0.01, 0.005])]
    digests, losses = [], []
    for threads in (1, 3):
        model = wide(0)
        names, params = select_parameters(model)
        table = NoiseTable(1 << 16) if distribution == "table" else None
        space = DirectionSpace(names, params, distribution, table, threads=threads)
        fn = lambda: model(x).pow(2).mean()  # noqa: E731
        losses.append([Prober(model, space, m).evaluate(fn, 21, r) for m in ("swap", "hooks") for r in (0.01, -0.01)])
        apply_update(space, pairs, param_scale=0.999)
        assert all(not p.grad_fn and p.requires_grad for p in params)  # updated as leaves, under no_grad
        digests.append(model_digest(model))
    assert losses[0] == losses[1] and digests[0] == digests[1]
    with pytest.raises(ValueError, match="threads must be >= 1"):
        DirectionSpace(names, params, "gaussian", None, threads=0)


def test_chunked_streams(monkeypatch):
    # A parameter of at most CHUNK elements has one randn's noise; a longer one has fresh
    # numbers in every chunk (not chunk 0 repeated), and a parameter's noise does not depend
    # on how the chunks are cut into jobs.
    monkeypatch.setattr(noise, "CHUNK", 64)
    weight = torch.nn.Parameter(torch.zeros(10, 20))  # 200 elements: chunks of 64, 64, 64, 8
    small = torch.nn.Parameter(torch.zeros(7, 9))
    space = DirectionSpace(["w", "s"], [weight, small], "gaussian", None, threads=2)
    key = mix_seed(5, 1)
    assert torch.equal(space.noise(5, 1), torch.randn(7, 9, generator=torch.Generator().manual_seed(key)))
    z = space.noise(5, 0).reshape(-1)
    assert not torch.equal(z[:64], z[64:128])
    expected = torch.cat([torch.randn(hi - lo, generator=torch.Generator().manual_seed(noise.chunk_key(mix_seed(5, 0), k)))
                          for k, (lo, hi) in enumerate(noise.chunk_bounds(200))])
    assert torch.equal(z, expected)
    assert torch.equal(space.perturbed(5, 0, 0.5).reshape(-1), expected * 0.5)
    apply_update(space, [(5, 2.0)])
    assert torch.equal(weight.detach().reshape(-1), expected * 2.0)


def test_rademacher_signs_are_the_bits_of_the_random_words():
    gen = torch.Generator().manual_seed(3)
    words = torch.randint(-(1 << 63), (1 << 63) - 1, (2,), generator=gen, dtype=torch.int64)
    bits = [(int(b) >> j) & 1 for b in words.view(torch.uint8) for j in range(8)]
    for numel in (128, 100):  # a whole number of words, and a partial last word
        out = noise.rademacher_fill(torch.empty(numel), torch.Generator().manual_seed(3))
        assert out.tolist() == [2.0 * b - 1.0 for b in bits[:numel]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hooks_reuse_buffers_of_large_weights_without_leaking_values(dtype):
    # Weights of at least REUSE_MIN_NUMEL elements get their perturbed copies in buffers kept between
    # probes, half-precision ones in buffers of their dtype: a probe must not see the previous direction's
    # values, and the weights stay intact.
    from ray_s2p.zo.probes import REUSE_MIN_NUMEL
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(600, 600), torch.nn.Tanh(), torch.nn.Linear(600, 2)).to(dtype)
    assert model[0].weight.numel() >= REUSE_MIN_NUMEL
    x = torch.randn(4, 600, generator=torch.Generator().manual_seed(1)).to(dtype)
    fn = lambda: model(x).pow(2).mean()  # noqa: E731
    space = space_of(model)
    before = model_digest(model)
    hooks = Prober(model, space, "hooks")
    values = [hooks.evaluate(fn, seed, 0.05) for seed in (1, 2, 1, 3, 2)]
    swap = Prober(model, space, "swap")
    assert values == [swap.evaluate(fn, seed, 0.05) for seed in (1, 2, 1, 3, 2)]
    assert values[0] == values[2] and values[1] == values[4] and len(set(values)) == 3
    assert hooks._scratch, "the large weight's buffer is kept for the next probe"
    assert {key[2] for key in hooks._scratch} == {dtype}
    assert model_digest(model) == before


class Bag(torch.nn.Module):
    """An embedding lookup, pooled and classified: the probe of ``words`` reads only the rows the ids name."""

    def __init__(self, rows: int = 300, width: int = 7, padding_idx: int | None = 250) -> None:
        super().__init__()
        self.words = torch.nn.Embedding(rows, width, padding_idx=padding_idx)
        self.head = torch.nn.Linear(width, 3)

    def forward(self, ids: torch.Tensor, by_keyword: bool = False) -> torch.Tensor:
        vectors = self.words(input=ids) if by_keyword else self.words(ids)
        return self.head(vectors.mean(dim=1)).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher", "sphere"])
def test_embedding_probes_read_only_the_rows_they_look_up(distribution, dtype, monkeypatch):
    # 300 x 7 elements in chunks of 256: rows straddle chunk edges and several chunks hold no wanted row.
    monkeypatch.setattr(noise, "CHUNK", 256)
    torch.manual_seed(0)
    model = Bag().to(dtype)
    ids = torch.tensor([[3, 250, 3, 40], [299, 41, 0, 3]])
    labels = torch.tensor([0, 2])
    space = DirectionSpace(*select_parameters(model), distribution, threads=2)
    rows = torch.unique(ids)
    for seed in (5, 6):
        assert torch.equal(space.perturbed_rows(seed, 0, rows, 0.1), space.perturbed(seed, 0, 0.1)[rows])
    before = model_digest(model)
    hooks, swap = Prober(model, space, "hooks"), Prober(model, space, "swap")
    assert list(hooks._lookups.values()) == [0]
    assert hooks.held_copy_bytes == sum(p.numel() * p.element_size() for p in model.head.parameters())
    calls = [(by_keyword, seed, radius) for by_keyword in (False, True) for seed, radius in ((5, 0.1), (6, -0.1))]

    def fn(by_keyword: bool):
        return lambda: torch.nn.functional.cross_entropy(model(ids, by_keyword), labels)
    expected = [swap.evaluate(fn(by_keyword), seed, radius) for by_keyword, seed, radius in calls]
    whole_tables = []
    real = space.perturbed_many
    monkeypatch.setattr(space, "perturbed_many",
                        lambda seed, indices, *a, **k: whole_tables.extend(indices) or real(seed, indices, *a, **k))
    assert [hooks.evaluate(fn(by_keyword), seed, radius) for by_keyword, seed, radius in calls] == expected
    assert expected[:2] == expected[2:] and expected[0] != expected[1]
    assert whole_tables and 0 not in whole_tables, "the embedding's table is never copied whole"
    assert model.words.padding_idx == 250 and model_digest(model) == before
    with pytest.raises(IndexError, match="index out of range"):
        hooks.evaluate(lambda: model(torch.tensor([[1, 300]])).sum(), 5, 0.1)
    assert model.words.padding_idx == 250 and model_digest(model) == before
