"""Shared fixtures: tiny transformers and diffusers models built in code with fixed seeds."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")


def _pin_portable_bitsandbytes() -> None:
    """On CPUs with AVX-512, bitsandbytes 0.50's CPU backend differs from its own reference in two
    ways that have nothing to do with the checkpoint format: its native 4-bit dequantize kernel
    assumes quantization blocks never cross a row (a layer whose row length is not a multiple of
    the blocksize dequantizes to wrong values), and with AVX512-BF16 ``Linear4bit.forward``
    repacks the weight on the first eval call (bf16 absmax; the tiny test layers then fail its
    shape asserts, and a later ``state_dict`` re-quantizes absmax). The comparisons here are
    against bitsandbytes' portable implementation (what every other CPU runs), so they mean the
    same on every machine; README lists both behaviours."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return
    try:
        import bitsandbytes.nn.modules as bnb_modules
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
        from bitsandbytes.backends.utils import _get_4bit_code
    except ImportError:
        return

    def dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):  # type: ignore[no-untyped-def]
        packed = A if A.dtype == torch.uint8 else A.view(torch.uint8)
        code = _get_4bit_code(quant_type, A.device)
        return _dequantize_4bit_compute(packed.reshape(-1), absmax, code, blocksize, shape, dtype)

    torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", dequantize_4bit)
    bnb_modules.has_avx512bf16 = lambda: False


_pin_portable_bitsandbytes()


def tiny_llama_config():  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float tiny Llama saved by transformers."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama-base")
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(path)
    return path


@pytest.fixture
def llama_ids() -> torch.Tensor:
    return torch.tensor([[1, 5, 9, 33, 64, 2]])


#: A tiny diffusers UNet2DModel with attention blocks (Linear layers to quantize).
TINY_UNET = dict(
    sample_size=8,
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    block_out_channels=(32, 32),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
)


def sd3_kwargs() -> dict:
    return dict(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        out_channels=4,
    )


@pytest.fixture(scope="session")
def sd3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float tiny SD3 transformer saved by diffusers."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sd3-base")
    SD3Transformer2DModel(**sd3_kwargs()).save_pretrained(path)
    return path


@pytest.fixture
def sd3_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return dict(
        hidden_states=torch.randn(1, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
        pooled_projections=torch.randn(1, 16, generator=g),
        timestep=torch.tensor([1.0]),
    )


@pytest.fixture
def diffusers_bnb_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lifts only diffusers' "No GPU found" check so its bitsandbytes path runs on the CPU."""
    from diffusers.quantizers.bitsandbytes import bnb_quantizer

    for cls in (bnb_quantizer.BnB4BitDiffusersQuantizer, bnb_quantizer.BnB8BitDiffusersQuantizer):
        monkeypatch.setattr(cls, "validate_environment", lambda self, *a, **k: None)


def files_equal(a: Path, b: Path) -> list[str]:
    """Names of files in ``b`` whose bytes differ from (or are missing in) ``a``."""
    return [
        f
        for f in sorted(p.name for p in b.iterdir())
        if not (a / f).is_file() or (a / f).read_bytes() != (b / f).read_bytes()
    ]


def weight_owner(key: str) -> str | None:
    """The quantized Linear a bitsandbytes key belongs to (None for ordinary tensors)."""
    for suffix in (".SCB", ".weight_format"):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    if ".weight." in key:
        return key.split(".weight.")[0]
    return None


def split_groups(weight_map: dict[str, str]) -> list[str]:
    """Quantized weights whose tensors are spread over more than one shard."""
    out = []
    for key, fname in weight_map.items():
        owner = weight_owner(key)
        if owner is not None and weight_map.get(owner + ".weight") != fname:
            out.append(owner)
    return sorted(set(out))


def check_against_reference(ours: Path, ref: Path, index_name: str) -> None:
    """Unsharded or when the reference kept every weight whole: identical bytes. Otherwise the
    only difference allowed is the deliberate one: the reference split a weight, quantsave did not."""
    import json

    if not (ref / index_name).is_file():
        assert files_equal(ours, ref) == []
        return
    a = json.loads((ours / index_name).read_text())
    b = json.loads((ref / index_name).read_text())
    assert a["metadata"] == b["metadata"]
    assert set(a["weight_map"]) == set(b["weight_map"])
    assert split_groups(a["weight_map"]) == []
    if split_groups(b["weight_map"]):
        assert (ours / "config.json").read_bytes() == (ref / "config.json").read_bytes()
    else:
        assert files_equal(ours, ref) == []


def quantized_on_load(model, tmp: Path, config, dtype: torch.dtype) -> Path:  # type: ignore[no-untyped-def]
    """The reference for a float diffusers model changed in memory (a LoRA fused): saved to
    ``tmp/merged``, loaded with ``quantization_config=config`` and saved again to ``tmp/hf``."""
    model.save_pretrained(tmp / "merged")
    type(model).from_pretrained(
        tmp / "merged", quantization_config=config, torch_dtype=dtype, device_map="cpu"
    ).save_pretrained(tmp / "hf")
    return tmp / "hf"
