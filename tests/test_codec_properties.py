"""Property tests of the Rust codec (``quantsave.codec``) against the codec spec and bitsandbytes.

Hypothesis draws the parameters (quant type, dtype, blocksize, length, data source, seed, special
blocks); large tensors come from a seeded torch generator so examples stay fast. Everything runs
with ``derandomize=True`` so CI sees the same examples on every run.

Error bounds come from the code tables: a value ``x`` in a block with absmax ``A`` is scaled to
``s = x / A`` in [-1, 1] and stored as the nearest code ``c``, so ``|c - s|`` is at most half the
widest gap between neighbouring codes (nf4: ``(-0.6961928 - -1.0) / 2 = 0.1519036``; fp4:
``(1.0 - 0.6666667) / 2 = 1/6``) and ``|c * A - x| <= A * half_gap``, plus rounding slack.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from quantsave import codec

F = pytest.importorskip("bitsandbytes.functional")

QUANT_TYPES = ["nf4", "fp4"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]

# bitsandbytes clamps the scale of a block to this (a float32 subnormal: 9.99999935e-39).
CLAMP = torch.tensor(1e-38, dtype=torch.float32).item()
# Half the widest gap of each sorted code table (nf4: between -1.0 and -0.6961928; fp4: between
# 0.6666667 and 1.0); checked against the tables themselves in test_code_tables_and_half_gaps.
HALF_GAP = {"nf4": (1.0 - 0.6961928009986877) / 2, "fp4": (1.0 - 0.6666666865348816) / 2}
# Code of 0.0 (also the pad nibble) and codes of +1.0 / -1.0.
ZERO_CODE = {"nf4": 7, "fp4": 0}
TOP_CODE = {"nf4": 15, "fp4": 0b0011}
BOTTOM_CODE = {"nf4": 0, "fp4": 0b1011}
# Relative rounding of the dequantized value to the output dtype (twice the unit roundoff) and
# the absolute rounding near zero (subnormal spacing of the output dtype; f32 products too).
DTYPE_REL = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}
DTYPE_ABS = {torch.float32: 2.0**-149, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}
# Largest power of ten the seeded generator scales values by, per dtype (float16 overflows at 65504).
DTYPE_MAX_EXP10 = {torch.float32: 30, torch.bfloat16: 30, torch.float16: 3}

HYP = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
HYP_MAIN = settings(HYP, max_examples=250)  # the bitsandbytes comparison and the round trip


# --------------------------------------------------------------------------------------------
# helpers


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """All nibbles of a packed tensor, high nibble first, as int64."""
    b = packed.reshape(-1).view(torch.uint8).to(torch.int64)
    return torch.stack([b >> 4, b & 0xF], 1).reshape(-1)


def _table(quant_type: str) -> torch.Tensor:
    return codec._code(quant_type).double()


def _block_lengths(n: int, blocksize: int) -> list[int]:
    return [min(blocksize, n - s) for s in range(0, n, blocksize)]


def _event(label: str) -> None:
    """Counts a case kind in ``--hypothesis-show-statistics`` (outside @given: nothing)."""
    if currently_in_test_context():
        event(label)


def _state2_blocks(state) -> int:  # type: ignore[no-untyped-def]
    return state.state2.absmax.numel()


def _bnb_dequantize_4bit(packed: torch.Tensor, state) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """bitsandbytes' dequantize_4bit, with its eager code path for odd last dimensions.

    bitsandbytes runs that path through ``torch.compile(dynamic=False)``, which recompiles for
    every new shape (seconds each); with dynamo disabled its wrapper runs the same function
    eagerly. tests/test_codec.py covers the compiled path.
    """
    with torch._dynamo.config.patch(disable=True):
        return F.dequantize_4bit(packed, state)


def _scaled_f32(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """The normalized values the quantizer encodes, in float32 as bitsandbytes computes them:
    ``x * (1 / absmax)`` in full blocks, ``x / absmax`` in the partial last block (absmax
    clamped to 1e-38)."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    head = flat[:full].reshape(-1, blocksize)
    head = head * (1.0 / head.abs().amax(dim=1, keepdim=True).clamp(min=1e-38))
    tail = flat[full:]
    if tail.numel():
        tail = tail / tail.abs().max().clamp(min=1e-38)
    return torch.cat([head.reshape(-1), tail]).clamp(-1, 1)


def _assert_codes_match_bitsandbytes(
    ref: torch.Tensor, got: torch.Tensor, x: torch.Tensor, blocksize: int, quant_type: str
) -> None:
    """nf4: identical bytes. fp4: identical except the sign bit of zero-magnitude codes, which
    quantsave sets when the normalized value is < 0 (bitsandbytes' CUDA rule: in practice
    ``x < 0``, unless ``x / absmax`` underflows to -0.0); bitsandbytes' CPU path differs."""
    assert got.dtype == ref.dtype and got.shape == ref.shape
    if quant_type == "nf4":
        assert torch.equal(got, ref)
        return
    a, b = _nibbles(ref), _nibbles(got)
    differ = a != b
    if bool(differ.any()):
        _event("fp4: sign of a zero code differs from bitsandbytes' CPU rule")
    assert bool(((a[differ] & 7) == 0).all()), "fp4 codes differ beyond the sign of zero"
    assert bool(((b[differ] & 7) == 0).all()), "fp4 codes differ beyond the sign of zero"
    n = x.numel()
    scaled = _scaled_f32(x, blocksize)
    zero_mag = (b[:n] & 7) == 0
    assert torch.equal((b[:n][zero_mag] & 8) != 0, scaled[zero_mag] < 0)
    # Where the scaled value did not underflow, that is exactly x < 0.
    flat = x.reshape(-1).float()
    kept = zero_mag & ((scaled != 0) | (flat == 0))
    assert torch.equal((b[:n][kept] & 8) != 0, flat[kept] < 0)


def _assert_matches_bitsandbytes(x: torch.Tensor, blocksize: int, quant_type: str, nested: bool) -> tuple:
    ref, ref_state = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    got, state = codec.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    _assert_codes_match_bitsandbytes(ref, got, x, blocksize, quant_type)
    assert state.shape == ref_state.shape and state.dtype == ref_state.dtype
    assert state.blocksize == ref_state.blocksize and state.quant_type == ref_state.quant_type
    assert state.absmax.dtype == ref_state.absmax.dtype
    assert torch.equal(state.code, ref_state.code)
    _event(f"partial last block: {x.numel() % blocksize != 0}, odd length: {x.numel() % 2 == 1}")
    if nested:
        _event(f"nested blocks > 1: {_state2_blocks(state) > 1}")
        assert torch.equal(state.offset, ref_state.offset)
        assert torch.equal(state.state2.absmax, ref_state.state2.absmax)
        assert torch.equal(state.state2.code, ref_state.state2.code)
        assert state.state2.blocksize == ref_state.state2.blocksize == 256
        s2 = state.state2.absmax
        if bool(((s2 > 0) & torch.isinf(1.0 / s2)).any()):
            _event("nested absmax below 2**-128 (1 / absmax overflows)")
    else:
        assert ref_state.state2 is None and state.state2 is None
    assert torch.equal(state.absmax, ref_state.absmax)  # float32 absmax, or uint8 codes when nested
    back = codec.dequantize_4bit(got, state)
    ref_back = _bnb_dequantize_4bit(ref, ref_state)
    # bitsandbytes' CPU kernel returns shape (1, n) for even-length 1-D input; quantsave keeps x.shape.
    assert back.shape == x.shape and back.dtype == x.dtype
    _assert_same_values(back, ref_back)
    # And quantsave dequantizes bitsandbytes' own output to the same values.
    _assert_same_values(codec.dequantize_4bit(ref, ref_state), ref_back)
    return got, state, back


def _assert_same_values(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal values, NaN where the reference has NaN. (Double quantization of absmax values whose
    mean overflows float32, near 3.4e38, gives an infinite offset and NaN in both libraries.)"""
    got, ref = got.reshape(-1), ref.reshape(-1)
    nan = ref.isnan()
    if bool(nan.any()):
        _event("dequantized NaN (overflowing double-quant offset), in both libraries")
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan], ref[~nan])


def _dtype_bits(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int bit patterns -> floats of `dtype` (same width)."""
    if dtype == torch.float32:
        return values.to(torch.int32).view(torch.float32)
    return values.to(torch.int16).view(dtype)


# --------------------------------------------------------------------------------------------
# strategies


@st.composite
def _length(draw, blocksize: int, many_blocks: bool = True) -> int:  # type: ignore[no-untyped-def]
    """Lengths of whole blocks plus a remainder (often a partial block, often odd)."""
    if many_blocks and blocksize <= 64:
        full = draw(st.one_of(st.integers(0, 4), st.integers(255, 520)))
    else:
        full = draw(st.integers(0, 4))
    low = 1 if full == 0 else 0
    rem = draw(st.one_of(st.just(low), st.just(1), st.integers(low, blocksize - 1)))
    return full * blocksize + rem


@st.composite
def _cases(draw):  # type: ignore[no-untyped-def]
    """(x, blocksize): random tensors of every dtype, odd and partial-block lengths."""
    dtype = draw(st.sampled_from(DTYPES))
    source = draw(st.sampled_from(["normal", "heavy", "ties", "raw"]))
    if source == "raw":
        # Hypothesis' own floats: subnormals, +-0, huge values, float32 extremes.
        blocksize = draw(st.sampled_from(BLOCKSIZES[:3]))
        n = draw(st.integers(1, 300))
        width = 16 if dtype == torch.float16 else 32
        vals = draw(st.lists(st.floats(width=width, allow_nan=False, allow_infinity=False), min_size=n, max_size=n))
        x = torch.tensor(vals, dtype=torch.float32).to(dtype)
        assume(bool(torch.isfinite(x).all()))  # bf16 rounding can overflow float32 extremes
        return x, blocksize
    blocksize = draw(st.sampled_from(BLOCKSIZES))
    n = draw(_length(blocksize))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    nblocks = -(-n // blocksize)
    if source == "ties":
        # Code values and the midpoints between neighbours (both tables), in blocks whose absmax
        # is a power of two: scaling is exact, so the tie rules are exercised (ties go to the
        # lower code). Only float32 holds every midpoint exactly, so ties favour it.
        dtype = draw(st.sampled_from([torch.float32, torch.float32, dtype]))
        mids = [codec._code(qt).sort().values for qt in QUANT_TYPES]
        mids = torch.cat([(c[:-1] + c[1:]) / 2 for c in mids] + mids)  # float32 midpoints, as bitsandbytes
        mids = torch.cat([mids, -mids])
        x = mids[torch.randint(0, mids.numel(), (n,), generator=g)]
        x[torch.arange(0, n, blocksize)] = 1.0  # each block's absmax is exactly the scale
        exps = torch.randint(-10, 11, (nblocks,), generator=g).repeat_interleave(blocksize)[:n]
        return (x.double() * torch.pow(2.0, exps.double())).to(dtype), blocksize
    x = torch.randn(n, generator=g, dtype=torch.float64)
    if source == "heavy":
        x = x * torch.randn(n, generator=g, dtype=torch.float64).abs().pow(3)
    top = DTYPE_MAX_EXP10[dtype]
    exp = draw(st.integers(-top, top - 2))
    # Blocks of very different magnitudes, and some all-zero blocks.
    per_block = torch.randint(-2, 3, (nblocks,), generator=g).double()
    per_block[torch.rand(nblocks, generator=g) < 0.1] = float("-inf")  # 10**-inf = 0
    x = x * torch.pow(10.0, per_block.repeat_interleave(blocksize)[:n] + exp)
    if dtype == torch.float16:
        x = x.clamp(-65000, 65000)
    x = x.to(dtype)
    assume(bool(torch.isfinite(x).all()))
    shape = draw(st.sampled_from(["flat", "2d"]))
    if shape == "2d":
        cols = draw(st.sampled_from([d for d in (2, 3, 5, 7, 16, 64) if n % d == 0] or [1]))
        x = x.reshape(n // cols, cols)
    return x, blocksize


# --------------------------------------------------------------------------------------------
# code tables


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_code_tables_and_half_gaps(quant_type) -> None:  # type: ignore[no-untyped-def]
    code = codec._code(quant_type)
    ref = F.get_4bit_type(quant_type, device="cpu")
    assert code.view(torch.int32).tolist() == ref.float().view(torch.int32).tolist()
    s = code.double().sort().values
    assert (s[1:] - s[:-1]).max().item() / 2 == pytest.approx(HALF_GAP[quant_type], abs=1e-7)
    assert code[ZERO_CODE[quant_type]] == 0.0
    assert code[TOP_CODE[quant_type]] == 1.0 and code[BOTTOM_CODE[quant_type]] == -1.0


# --------------------------------------------------------------------------------------------
# (a) round trip: nearest code, and error within absmax * half gap


@HYP_MAIN
@given(case=_cases(), quant_type=st.sampled_from(QUANT_TYPES))
def test_round_trip_error_within_half_gap(case, quant_type) -> None:  # type: ignore[no-untyped-def]
    x, bs = case
    n = x.numel()
    packed, state = codec.quantize_4bit(x, blocksize=bs, quant_type=quant_type)
    assert packed.shape == ((n + 1) // 2, 1) and packed.dtype == torch.uint8
    xs = x.reshape(-1).double()

    # Stored absmax: max |x| of each block; the last partial block stores it clamped to 1e-38.
    lengths = _block_lengths(n, bs)
    expected = []
    for b, length in enumerate(lengths):
        m = xs[b * bs : b * bs + length].abs().max().item()
        expected.append(max(m, CLAMP) if length < bs else m)
    assert state.absmax.tolist() == expected

    nib = _nibbles(packed)
    if n % 2:
        assert nib[n].item() == ZERO_CODE[quant_type], "pad nibble must be the code of 0.0"
    codes = nib[:n]
    table = _table(quant_type)
    stored = state.absmax.double().repeat_interleave(bs)[:n]
    scale = stored.clamp(min=CLAMP)  # the scale the quantizer divided by
    s = xs / scale
    assert bool((s.abs() <= 1.0).all())
    # Every value takes a nearest code (float32 scaling costs at most ~1e-7 in scaled units).
    chosen = (table[codes] - s).abs()
    nearest = (table[None, :] - s[:, None]).abs().min(dim=1).values
    assert bool((chosen <= nearest + 1e-6).all()), "a value did not take the nearest code"

    back = codec.dequantize_4bit(packed, state)
    assert back.shape == x.shape and back.dtype == x.dtype
    err = (back.reshape(-1).double() - xs).abs()
    bound = stored * (HALF_GAP[quant_type] + 2.0**-21 + DTYPE_REL[x.dtype]) + DTYPE_ABS[x.dtype]
    # A full block whose absmax is below the 1e-38 clamp is scaled by the clamp but dequantized
    # with its own absmax (as bitsandbytes does): its error is only bounded by that absmax.
    bound = torch.where(stored < CLAMP, stored, bound)
    worst = int((err - bound).argmax())
    assert bool((err <= bound).all()), (
        f"x={xs[worst].item()!r} -> {back.reshape(-1)[worst].item()!r}, absmax {stored[worst].item()!r}"
    )


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_ties_take_the_lower_code(quant_type) -> None:  # type: ignore[no-untyped-def]
    """A value exactly between two codes takes the lower one (bitsandbytes' bucketize); for fp4
    that is the smaller magnitude for x > 0 and the larger magnitude (sign set) for x < 0."""
    code = codec._code(quant_type)
    # Codes by value; fp4's -0 (code 8) sorts before +0 (code 0), so a positive tie above zero
    # lands on +0 and a negative one below zero on -0.0052 (code 9).
    order = torch.tensor(sorted(range(16), key=lambda c: (code[c].item(), -c)))
    sorted_code = code[order]
    distinct = sorted_code[:-1] != sorted_code[1:]
    mids = ((sorted_code[:-1] + sorted_code[1:]) / 2)[distinct]  # float32, as bitsandbytes
    lower = order[:-1][distinct]
    assert mids.numel() == (15 if quant_type == "nf4" else 14)
    # absmax 1.0 times a power of two keeps every scaled value exact: all are ties.
    for scale in (1.0, 2.0**-20, 2.0**10):
        x = torch.cat([torch.tensor([1.0]), mids, torch.zeros(64 - 1 - mids.numel())]) * scale
        packed, _ = codec.quantize_4bit(x, blocksize=64, quant_type=quant_type)
        assert _nibbles(packed)[1 : 1 + mids.numel()].tolist() == lower.tolist(), f"scale {scale}"
        _assert_matches_bitsandbytes(x, 64, quant_type, nested=False)


# --------------------------------------------------------------------------------------------
# (b) identical to bitsandbytes, plain and double-quantized statistics


@HYP_MAIN
@given(case=_cases(), quant_type=st.sampled_from(QUANT_TYPES), nested=st.booleans())
def test_identical_to_bitsandbytes(case, quant_type, nested) -> None:  # type: ignore[no-untyped-def]
    x, bs = case
    _assert_matches_bitsandbytes(x, bs, quant_type, nested)


# Nested (double) quantization: bitsandbytes' CPU kernel (csrc/common.cpp: ``A[i] / absmax``)
# is compiled so that it behaves as ``A[i] * (1 / absmax)``. That differs from a true division
# by one ulp for some values, which changes the code when a decision threshold lies between the
# two (about one nested absmax in 10**6 on random weights, so random tests rarely see it), and
# 1 / absmax overflows to inf below 2**-128, which saturates the codes.


def test_nested_codes_follow_bitsandbytes_reciprocal_rounding() -> None:
    # absmax [0.25, a1, 2.0], offset = their mean 1.1602660 (0x3f948399); for a1 - offset =
    # 0.0705322 and m = 0.9102660, the division gives 0x3d9eb098, exactly the threshold of
    # code 183, and the multiplication by 1 / m gives 0x3d9eb097, one ulp below: code 182.
    a1 = torch.tensor([0x3F9D8ACC], dtype=torch.int32).view(torch.float32).item()  # 1.2307982
    x = torch.zeros(3 * 64)
    x[0], x[64], x[128] = 0.25, a1, 2.0
    _, ref_state = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    _, state = codec.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert ref_state.absmax.tolist() == [0, 182, 249]
    assert torch.equal(state.offset, ref_state.offset)
    assert torch.equal(state.state2.absmax, ref_state.state2.absmax)
    assert state.absmax.tolist() == [0, 182, 249]  # a true division would give 183


def test_nested_codes_when_reciprocal_of_absmax_overflows() -> None:
    from quantsave import _core

    m = 2.9e-39  # below 2**-128: 1 / m is inf in float32
    values = torch.tensor([m, -m, m / 2, -m / 4, 0.0], dtype=torch.float32)
    ref, ref_state = F.quantize_blockwise(values, blocksize=256)
    codes, absmax = _core.quantize_dynamic(values.numpy().tobytes(), 0.0, 256)
    assert ref.tolist() == [255, 0, 255, 0, 0]  # +-inf saturate; 0 * inf = NaN takes code 0
    assert absmax == ref_state.absmax.numpy().tobytes()
    assert list(codes) == ref.tolist()  # a true division would give [255, 0, 219, 53, 131]


# --------------------------------------------------------------------------------------------
# (c) zero blocks, constant blocks, subnormal inputs


@st.composite
def _constant(draw, dtype: torch.dtype) -> float:  # type: ignore[no-untyped-def]
    """A nonzero normal value of `dtype` (normal in float32 too, so 1/|c| scales it to 1)."""
    lo, hi = (-14, 14) if dtype == torch.float16 else (-125, 125)
    mant = draw(st.floats(1.0, 2.0, exclude_max=True))
    c = torch.tensor(mant * 2.0 ** draw(st.integers(lo, hi)), dtype=torch.float64).to(dtype)
    return c.item()


@HYP
@given(
    data=st.data(),
    quant_type=st.sampled_from(QUANT_TYPES),
    dtype=st.sampled_from(DTYPES),
    bs=st.sampled_from(BLOCKSIZES),
    kinds=st.lists(st.sampled_from(["zero", "const", "random"]), min_size=1, max_size=5),
    rem=st.one_of(st.just(0), st.integers(1, 40)),
    nested=st.booleans(),
)
def test_zero_and_constant_blocks(data, quant_type, dtype, bs, kinds, rem, nested) -> None:  # type: ignore[no-untyped-def]
    rem = min(rem, bs - 1)
    lengths = [bs] * (len(kinds) - 1) + [rem or bs]
    c = data.draw(_constant(dtype), label="c")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31), label="seed"))
    parts, consts = [], []
    for kind, length in zip(kinds, lengths, strict=True):
        if kind == "zero":  # +0.0 and -0.0 mixed
            signs = torch.randint(0, 2, (length,), generator=g).double() * 2 - 1
            block = torch.zeros(length, dtype=torch.float64) * signs
            consts.append(0.0)
        elif kind == "const":
            v = c * data.draw(st.sampled_from([1.0, -1.0]), label="sign")
            block = torch.full((length,), v, dtype=torch.float64)
            consts.append(v)
        else:
            block = torch.randn(length, generator=g, dtype=torch.float64)
            consts.append(None)
        parts.append(block)
    x = torch.cat(parts).to(dtype)
    n = x.numel()

    packed, _state, back = _assert_matches_bitsandbytes(x, bs, quant_type, nested)
    codes = _nibbles(packed)
    back = back.reshape(-1)
    plain_absmax = codec.quantize_4bit(x, blocksize=bs, quant_type=quant_type)[1].absmax
    for b, (kind, length) in enumerate(zip(kinds, lengths, strict=True)):
        sl = slice(b * bs, b * bs + length)
        v = consts[b]
        if kind == "zero":
            # absmax 0 (a partial block stores the 1e-38 clamp), every code is the code of 0.0,
            # and the value comes back as exactly 0, double-quantized absmax or not.
            assert plain_absmax[b].item() == (0.0 if length == bs else CLAMP)
            assert bool((codes[sl] == ZERO_CODE[quant_type]).all())
            assert bool((back[sl] == 0).all())
        elif kind == "const":
            assert plain_absmax[b].item() == abs(v)
            want = TOP_CODE[quant_type] if v > 0 else BOTTOM_CODE[quant_type]
            assert bool((codes[sl] == want).all()), "a constant block must use the +-1.0 code"
            if not nested:  # +-1.0 is in the table: c comes back exactly
                assert bool((back[sl].double() == v).all())
    if n % 2:
        assert codes[n].item() == ZERO_CODE[quant_type]


def _subnormals(g: torch.Generator, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Random subnormals of `dtype` (exponent field 0, nonzero mantissa, either sign)."""
    mant_bits, sign = {
        torch.float32: (23, -(2**31)), torch.bfloat16: (7, -(2**15)), torch.float16: (10, -(2**15))
    }[dtype]
    mant = torch.randint(1, 2**mant_bits, (n,), generator=g, dtype=torch.int64)
    neg = torch.randint(0, 2, (n,), generator=g, dtype=torch.int64).bool()
    bits = torch.where(neg, mant + sign, mant)
    return _dtype_bits(bits, dtype)


@HYP
@given(
    quant_type=st.sampled_from(QUANT_TYPES),
    dtype=st.sampled_from(DTYPES),
    bs=st.sampled_from(BLOCKSIZES[:5]),
    seed=st.integers(0, 2**31),
    normal_fraction=st.sampled_from([0.0, 0.0, 0.05, 0.5]),
    nested=st.booleans(),
    data=st.data(),
)
def test_subnormal_inputs_match_bitsandbytes(quant_type, dtype, bs, seed, normal_fraction, nested, data) -> None:  # type: ignore[no-untyped-def]
    n = data.draw(_length(bs, many_blocks=False), label="n")
    g = torch.Generator().manual_seed(seed)
    x = _subnormals(g, n, dtype)
    # Some blocks get a few normal values, some zeros; others stay entirely subnormal.
    nblocks = -(-n // bs)
    block_has_normals = torch.rand(nblocks, generator=g) < normal_fraction
    mixed = block_has_normals.repeat_interleave(bs)[:n] & (torch.rand(n, generator=g) < 0.3)
    x[mixed] = torch.randn(int(mixed.sum()), generator=g).to(dtype)
    x[torch.rand(n, generator=g) < 0.05] = 0
    _packed, state, back = _assert_matches_bitsandbytes(x, bs, quant_type, nested)
    if not nested:
        # Full blocks keep their exact absmax, subnormal or not (only partial blocks are clamped),
        # and nothing dequantizes beyond it.
        xs = x.reshape(-1).double()
        for b, length in enumerate(_block_lengths(n, bs)):
            if length == bs:
                assert state.absmax[b].item() == xs[b * bs : (b + 1) * bs].abs().max().item()
        limit = state.absmax.double().repeat_interleave(bs)[:n] * (1 + DTYPE_REL[dtype]) + DTYPE_ABS[dtype]
        assert bool((back.reshape(-1).double().abs() <= limit).all())


def test_specific_subnormals_match_bitsandbytes() -> None:
    """Fixed float32 and bf16 subnormal blocks (e.g. 1e-40) against bitsandbytes, both types."""
    f32 = torch.tensor([1e-40, -3e-41, 5e-45, 0.0, -1e-45, 1.1e-38, -2e-39, 7e-42] * 8)
    bf16 = torch.tensor([1e-39, -4e-40, 9.2e-41, 0.0, -1e-38, 5e-39, 3e-40, -9.2e-41] * 8, dtype=torch.bfloat16)
    assert bool(((bf16.float().abs() < 1.1754944e-38) & (bf16 != 0)).any())
    for x in (f32, f32[:37], bf16, bf16[:37], torch.cat([f32, torch.tensor([1.0])])):
        for qt in QUANT_TYPES:
            for nested in (False, True):
                _assert_matches_bitsandbytes(x, 32, qt, nested)


# --------------------------------------------------------------------------------------------
# (d) NaN and infinity are a ValueError, never a crash


def _non_finite_bits(draw, dtype: torch.dtype) -> int:  # type: ignore[no-untyped-def]
    """Bit pattern (signed integer of the dtype's width) of +-inf or a NaN of any payload and sign."""
    if dtype == torch.float32:
        exp_bits, mant_bits, width = 8, 23, 32
    elif dtype == torch.bfloat16:
        exp_bits, mant_bits, width = 8, 7, 16
    else:
        exp_bits, mant_bits, width = 5, 10, 16
    mant = draw(st.one_of(st.just(0), st.integers(0, 2**mant_bits - 1)))  # 0: infinity
    sign = draw(st.booleans())
    bits = ((2**exp_bits - 1) << mant_bits) | mant
    if sign:
        bits -= 2**width  # as a signed integer of that width
    return bits


@HYP
@given(
    data=st.data(),
    quant_type=st.sampled_from(QUANT_TYPES),
    dtype=st.sampled_from(DTYPES),
    bs=st.sampled_from(BLOCKSIZES),
    nested=st.booleans(),
)
def test_non_finite_4bit_is_a_value_error(data, quant_type, dtype, bs, nested) -> None:  # type: ignore[no-untyped-def]
    n = data.draw(st.integers(1, 3 * bs + 7), label="n")
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
    k = data.draw(st.integers(1, 3), label="how many")
    for _ in range(k):
        pos = data.draw(st.integers(0, n - 1), label="pos")
        x[pos] = _dtype_bits(torch.tensor([_non_finite_bits(data.draw, dtype)]), dtype)[0]
    assert not bool(torch.isfinite(x).all())
    with pytest.raises(ValueError, match=r"^cannot quantize NaN or infinite values$"):
        codec.quantize_4bit(x, blocksize=bs, quant_type=quant_type, compress_statistics=nested)
    # The codec is still usable afterwards.
    ok, _ = codec.quantize_4bit(torch.ones(8), blocksize=32, quant_type="nf4")
    assert ok.reshape(-1).tolist() == [0xFF] * 4


@HYP
@given(
    data=st.data(),
    dtype=st.sampled_from(DTYPES),
    rows=st.integers(1, 40),
    cols=st.integers(1, 300),
)
def test_non_finite_8bit_is_a_value_error(data, dtype, rows, cols) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows * 1000 + cols)).to(dtype)
    r, c = data.draw(st.integers(0, rows - 1), label="row"), data.draw(st.integers(0, cols - 1), label="col")
    x[r, c] = _dtype_bits(torch.tensor([_non_finite_bits(data.draw, dtype)]), dtype)[0]
    with pytest.raises(ValueError, match=r"^cannot quantize NaN or infinite values$"):
        codec.quantize_8bit(x)


@pytest.mark.parametrize("big", [65520.0, -1e5, 3e38])
def test_8bit_values_overflowing_float16_are_a_value_error(big) -> None:  # type: ignore[no-untyped-def]
    """quantize_8bit converts to float16 first; a finite float32 that overflows it is rejected."""
    x = torch.ones(3, 5)
    x[1, 2] = big
    with pytest.raises(ValueError, match="NaN or infinite"):
        codec.quantize_8bit(x)


# --------------------------------------------------------------------------------------------
# (e) LLM.int8 rows


@st.composite
def _int8_matrix(draw):  # type: ignore[no-untyped-def]
    rows, cols = draw(st.integers(1, 48)), draw(st.integers(1, 300))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    kind = draw(st.sampled_from(["normal", "heavy", "ties", "wide"]))
    if kind == "ties":
        # Rows with absmax 127 and half-integers: x * 127 / 127 lands exactly on .5 (round half even).
        x = torch.randint(-254, 255, (rows, cols), generator=g).double() / 2
        x[:, 0] = 127.0
    else:
        x = torch.randn(rows, cols, generator=g, dtype=torch.float64)
        if kind == "heavy":
            x = x * torch.randn(rows, cols, generator=g, dtype=torch.float64).abs().pow(3)
        if kind == "wide":  # rows from 1e-6 to 1e4, subnormal float16 values included
            x = x * torch.pow(10.0, torch.randint(-6, 5, (rows, 1), generator=g).double())
    x = x.clamp(-65000, 65000)
    x[torch.rand(rows, generator=g) < 0.1] = 0  # whole zero rows
    return x.to(torch.float16)


@HYP
@given(x=_int8_matrix())
def test_int8_identical_to_bitsandbytes_and_round_trip(x) -> None:  # type: ignore[no-untyped-def]
    q, scb = codec.quantize_8bit(x)
    ref_q, ref_scb, _ = F.int8_vectorwise_quant(x.clone())
    assert q.dtype == torch.int8 and scb.dtype == torch.float32
    assert torch.equal(q, ref_q)
    assert torch.equal(scb, ref_scb)
    xs = x.double()
    scaled = xs * 127 / scb.double().clamp(min=2.0**-24)[:, None]
    if bool(((scaled - scaled.floor()) == 0.5).any()):
        _event("int8: exact .5 ties (round half to even)")
    assert torch.equal(scb.double(), xs.abs().max(dim=1).values)
    assert int(q.abs().max()) <= 127
    back = codec.dequantize_8bit(q, scb)
    assert back.dtype == torch.float32 and back.shape == x.shape
    err = (back.double() - xs).abs()
    # Half a step of SCB / 127, plus float32 rounding of x * scale and of q * SCB / 127.
    bound = scb.double() / 127 / 2 + scb.double() * 2.0**-21 + 2.0**-149
    assert bool((err <= bound[:, None]).all())


@HYP
@given(x=_int8_matrix(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_int8_converts_other_dtypes_to_float16_first(x, dtype) -> None:  # type: ignore[no-untyped-def]
    wide = x.to(dtype)
    assume(bool(torch.isfinite(wide.half()).all()))
    q, scb = codec.quantize_8bit(wide)
    ref_q, ref_scb, _ = F.int8_vectorwise_quant(wide.half())
    assert torch.equal(q, ref_q) and torch.equal(scb, ref_scb)


def test_int8_rows_without_columns_have_zero_absmax() -> None:
    """A (rows, 0) weight has nothing to scale: SCB is all zeros (bitsandbytes divides by zero)."""
    for _ in range(3):  # torch.empty would hand back different garbage from run to run
        q, scb = codec.quantize_8bit(torch.empty(5, 0, dtype=torch.float16))
        assert q.shape == (5, 0) and torch.equal(scb, torch.zeros(5))
