"""The Rust codec against bitsandbytes' CPU kernels: packed bytes, absmax and dequantized values."""

from __future__ import annotations

import pytest
import torch

from quantsave import codec

F = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(64, 64), (33, 17), (7,), (256, 1000), (1, 1)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _weights(shape: tuple[int, ...], dtype: torch.dtype, heavy: bool, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    if heavy:
        x = x * torch.randn(*shape, generator=g).abs().pow(3)
    return x.to(dtype)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    b = packed.reshape(-1).view(torch.uint8)
    return torch.stack([b >> 4, b & 0xF], 1).reshape(-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("heavy", [False, True])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_nf4_identical_to_bitsandbytes(dtype, shape, heavy, blocksize) -> None:  # type: ignore[no-untyped-def]
    x = _weights(shape, dtype, heavy)
    ref, ref_state = F.quantize_4bit(x, blocksize=blocksize, quant_type="nf4")
    got, state = codec.quantize_4bit(x, blocksize=blocksize, quant_type="nf4")
    assert torch.equal(got, ref)
    assert torch.equal(state.absmax, ref_state.absmax)
    assert state.shape == ref_state.shape and state.dtype == ref_state.dtype
    assert torch.equal(codec.dequantize_4bit(got, state), F.dequantize_4bit(ref, ref_state))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_fp4_identical_up_to_sign_of_zero(dtype, shape) -> None:  # type: ignore[no-untyped-def]
    x = _weights(shape, dtype, heavy=True)
    ref, ref_state = F.quantize_4bit(x, blocksize=64, quant_type="fp4")
    got, state = codec.quantize_4bit(x, blocksize=64, quant_type="fp4")
    assert torch.equal(state.absmax, ref_state.absmax)
    a, b = _nibbles(ref), _nibbles(got)
    differ = a != b
    # Only codes of zero magnitude may differ, and only in the sign bit (CUDA rule: x < 0).
    assert bool(((a[differ] & 7) == 0).all()) and bool(((b[differ] & 7) == 0).all())
    flat = x.reshape(-1).float()
    n = flat.numel()
    sign = (b[:n] & 8) != 0
    zero_mag = (b[:n] & 7) == 0
    assert torch.equal(sign[zero_mag], flat[zero_mag] < 0)
    # Dequantized values are equal (both zeros are 0.0).
    assert torch.equal(codec.dequantize_4bit(got, state), F.dequantize_4bit(ref, ref_state))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_bitsandbytes_state(quant_type, dtype) -> None:  # type: ignore[no-untyped-def]
    """Dequantizing what bitsandbytes produced (double quant included) gives its exact values."""
    x = _weights((128, 96), dtype, heavy=False, seed=3)
    for nested in (False, True):
        packed, state = F.quantize_4bit(x, blocksize=64, quant_type=quant_type, compress_statistics=nested)
        assert torch.equal(codec.dequantize_4bit(packed, state), F.dequantize_4bit(packed, state))


def test_double_quant_statistics() -> None:
    x = _weights((256, 512), torch.bfloat16, heavy=False)
    ref, ref_state = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    got, state = codec.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(got, ref)
    assert torch.equal(state.offset, ref_state.offset)
    assert torch.equal(state.state2.absmax, ref_state.state2.absmax)
    assert torch.equal(state.state2.code, ref_state.state2.code)
    assert state.state2.blocksize == ref_state.state2.blocksize == 256
    assert torch.equal(state.absmax, ref_state.absmax)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heavy", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_double_quant_codes_identical_to_bitsandbytes(dtype, heavy, quant_type) -> None:  # type: ignore[no-untyped-def]
    """Nested absmax codes follow bitsandbytes' own (not always nearest) search, bit for bit."""
    x = _weights((1024, 2000), dtype, heavy=heavy)
    _, ref_state = F.quantize_4bit(x, blocksize=64, quant_type=quant_type, compress_statistics=True)
    _, state = codec.quantize_4bit(x, blocksize=64, quant_type=quant_type, compress_statistics=True)
    assert torch.equal(state.absmax, ref_state.absmax)
    assert torch.equal(state.state2.absmax, ref_state.state2.absmax)
    assert torch.equal(state.offset, ref_state.offset)


def test_dynamic_blockwise_matches_bitsandbytes_quantize_blockwise() -> None:
    from quantsave import _core

    g = torch.Generator().manual_seed(5)
    values = torch.cat([torch.randn(5000, generator=g), torch.randn(3000, generator=g) * 1e-4])
    ref, ref_state = F.quantize_blockwise(values, blocksize=256)
    codes, absmax = _core.quantize_dynamic(values.numpy().tobytes(), 0.0, 256)
    assert bytes(ref.numpy().tobytes()) == codes
    assert ref_state.absmax.numpy().tobytes() == absmax


def test_odd_length_padding_and_layout() -> None:
    x = torch.tensor([1.0, -1.0, 0.0])
    packed, state = codec.quantize_4bit(x, blocksize=64, quant_type="nf4")
    # nf4: 1.0 -> 15, -1.0 -> 0, 0.0 -> 7; the pad nibble is the code of 0.0.
    assert packed.reshape(-1).tolist() == [0xF0, 0x77]
    assert state.absmax.tolist() == [1.0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_is_an_error(bad) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(100)
    x[17] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        codec.quantize_4bit(x, quant_type="nf4")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="blocksize"):
        codec.quantize_4bit(torch.randn(64), blocksize=48)
    with pytest.raises(ValueError, match="quant_type"):
        codec.quantize_4bit(torch.randn(64), quant_type="nf3")
    with pytest.raises(ValueError, match="16/32-bit floats"):
        codec.quantize_4bit(torch.arange(64))


@pytest.mark.parametrize("shape", [(32, 64), (5, 3), (128, 300)])
def test_int8_identical_to_bitsandbytes(shape) -> None:  # type: ignore[no-untyped-def]
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    q, scb = codec.quantize_8bit(w)
    ref_q, ref_scb, _ = F.int8_vectorwise_quant(w.to(torch.float16))
    assert torch.equal(q, ref_q) and torch.equal(scb, ref_scb)
    back = codec.dequantize_8bit(q, scb)
    assert (back - w).abs().max() <= scb.max() / 127


_FORK_INPUT = _weights((512, 512), torch.bfloat16, heavy=False)


def _child_quantize(queue) -> None:  # type: ignore[no-untyped-def]
    # As DataLoader workers do: torch's own OpenMP pool is not usable after fork.
    torch.set_num_threads(1)
    packed, _ = codec.quantize_4bit(_FORK_INPUT, quant_type="nf4")
    queue.put(bytes(packed.reshape(-1).numpy()[:16]))


def test_safe_after_fork() -> None:
    """Workers forked after the parent used the thread pool (DataLoader-style) still quantize."""
    import multiprocessing as mp

    expected, _ = codec.quantize_4bit(_FORK_INPUT, quant_type="nf4")  # the parent's pool is now running
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_quantize, args=(queue,))
    proc.start()
    proc.join(timeout=60)
    assert proc.exitcode == 0, "forked child hung or failed"
    assert queue.get(timeout=5) == bytes(expected.reshape(-1).numpy()[:16])


def test_thread_count_variable() -> None:
    import subprocess
    import sys

    code = (
        "import torch, quantsave.codec as c; "
        "p, _ = c.quantize_4bit(torch.randn(4096), quant_type='nf4'); print(p.numel())"
    )
    env = {**__import__("os").environ, "QUANTSAVE_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "2048"
