"""The embedded demo: a tiny transformer-shaped model built in code, quantized to nf4 with
bitsandbytes on the CPU, saved sharded, reloaded and checked. Downloads nothing."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TextIO

import torch
from torch import nn

__all__ = ["TinyModel", "run_demo"]


class Block(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.up = nn.Linear(hidden, 4 * hidden)
        self.down = nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.down(torch.nn.functional.gelu(self.up(self.norm(x))))
        return x + y


class TinyModel(nn.Module):
    """An embedding, ``layers`` MLP blocks and an output head."""

    def __init__(self, vocab: int = 512, hidden: int = 256, layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(Block(hidden) for _ in range(layers))
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        logits: torch.Tensor = self.head(x)
        return logits


def _nbytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def run_demo(out_dir: str | None = None, *, max_shard_size: str = "1MB", stream: TextIO | None = None) -> bool:
    """Runs the demo, prints a table, and returns True when the reloaded model matches."""
    import quantsave as qs

    def say(line: str) -> None:
        print(line, file=stream, flush=True)

    torch.manual_seed(0)
    model = TinyModel().eval()
    before = _nbytes(model)
    n_float = len(model.state_dict())
    config = qs.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    # Importing bitsandbytes takes seconds on its own; keep it out of the quantize timing.
    from quantsave.backends.bitsandbytes.quantizer import import_bnb

    import_bnb()
    t0 = time.perf_counter()
    qs.quantize(model, config, modules_to_not_convert=["head"])
    t_quant = time.perf_counter() - t0
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(out_dir) if out_dir else Path(tmp) / "tiny-nf4"
        result = qs.save_quantized(model, target, max_shard_size=max_shard_size)
        # Run the model only after saving it: on CPUs with AVX512-BF16, bitsandbytes repacks 4-bit
        # weights on the first forward (bf16 absmax), and a save after that re-quantizes absmax.
        with torch.no_grad():
            expected = model(ids)
        t0 = time.perf_counter()
        skeleton = TinyModel()
        loaded = qs.load_quantized(target, skeleton)
        t_load = time.perf_counter() - t0
        with torch.no_grad():
            got = loaded(ids)
        ok = torch.equal(got, expected)
        after = sum(f.stat().st_size for f in target.glob("*.safetensors"))
        n_tensors = len(qs.load_state_dict(target)[0])
    rows = [
        ("model", f"TinyModel ({n_float} float tensors, {before / 1e6:.2f} MB)"),
        ("quantization", "nf4 + double quant by the Rust codec on the CPU (bitsandbytes layers)"),
        ("tensors saved", str(n_tensors)),
        ("bytes before", f"{before:,}"),
        ("bytes after", f"{after:,} ({before / max(after, 1):.2f}x smaller)"),
        ("shards", f"{result.num_shards} (max_shard_size={max_shard_size})"),
        ("quantize seconds", f"{t_quant:.3f}"),
        ("save seconds", f"{result.seconds:.3f}"),
        ("load seconds", f"{t_load:.3f}"),
        ("outputs match", "yes" if ok else "NO"),
    ]
    width = max(len(k) for k, _ in rows)
    say("quantsave demo")
    for k, v in rows:
        say(f"  {k.ljust(width)}  {v}")
    if out_dir:
        say(f"  checkpoint written to {out_dir}")
    return ok
