"""Counter-based noise (zo/philox.py): Philox4x32-10 against Random123's published known answers, and the
reference against Triton's own ``tl.randint4x`` / ``tl.randn`` run in Triton's interpreter, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_s2p.zo.philox import philox4x32, randint4x, randn, uniform

# Random123's kat_vectors for philox4x32 with 10 rounds: (counter, key, output).
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
KEY = 0x1234_5678_9ABC_DEF  # a 64-bit key: both key words matter
# Offsets around 0, inside the first word and across the 2**32 boundary (the counter's second word).
OFFSETS = torch.cat([torch.arange(0, 700), torch.arange(2**32 - 300, 2**32 + 300), torch.tensor([2**40 + 7])])


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_philox_gives_random123s_known_answers(counter, key, expected):
    got = philox4x32(tuple(torch.tensor([c]) for c in counter), key)
    assert tuple(int(w[0]) for w in got) == expected


def test_words_are_uint32_and_uniforms_lie_in_zero_one():
    words = randint4x(KEY, OFFSETS)
    for w in words:
        assert int(w.min()) >= 0 and int(w.max()) <= 0xFFFFFFFF
    u = uniform(words[0])
    assert u.dtype == np.float32 and u.min() >= 0.0 and u.max() < 1.0
    z = randn(KEY, torch.arange(200_000))
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1.0) < 0.01  # 200 k normals: 4.5 sigma bounds


def _triton_interpreted():
    """Triton's random functions in its interpreter (CPU tensors; tests/conftest.py sets TRITON_INTERPRET=1),
    or None without triton."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def kernel(offsets_ptr, words_ptr, normals_ptr, key, n, BLOCK: tl.constexpr):
        index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = index < n
        offsets = tl.load(offsets_ptr + index, mask=mask, other=0)
        w0, w1, w2, w3 = tl.randint4x(key, offsets)
        for i, w in enumerate((w0, w1, w2, w3)):
            tl.store(words_ptr + i * n + index, w.to(tl.int32, bitcast=True), mask=mask)
        tl.store(normals_ptr + index, tl.randn(key, offsets), mask=mask)

    def run(key: int, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = offsets.numel()
        words = torch.empty(4 * n, dtype=torch.int32)
        normals = torch.empty(n, dtype=torch.float32)
        kernel[(triton.cdiv(n, 256),)](offsets.to(torch.int64), words, normals, key, n, BLOCK=256)
        return words.view(4, n), normals
    return run


def test_the_reference_is_tritons_randint4x_and_randn_bit_for_bit():
    run = _triton_interpreted()
    if run is None:
        pytest.skip("triton is not installed (it comes with the test and gpu extras on Linux x86_64 only)")
    words, normals = run(KEY, OFFSETS)
    ours = torch.stack(randint4x(KEY, OFFSETS))
    assert torch.equal((ours & 0xFFFFFFFF).to(torch.int64), words.to(torch.int64) & 0xFFFFFFFF)
    assert torch.equal(randn(KEY, OFFSETS).view(torch.int32), normals.view(torch.int32))
