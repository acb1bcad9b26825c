"""Side-by-side conversion benchmark: ``quantsave.convert`` against transformers'
``from_pretrained(quantization_config=nf4)`` + ``save_pretrained`` on the CPU.

Builds bf16 Llama-shaped checkpoints (hidden 2048 by default; the layer counts given), then for
each size runs every tool in a fresh process, timed from after ``import torch``, and reports the
medians of the wall time and of the peak RSS (``ru_maxrss``) against the process baseline with
torch imported. With ``--moe`` the checkpoints are Mixtral-shaped instead (8 experts per layer,
hidden 1024, expert width 1792; 14 layers make ~1.5 GB): per-expert weights on disk, which
transformers fuses on load and splits back on save, and quantsave streams as they are.

With ``--larger-than-ram GB`` it instead writes a Llama-shaped bf16 checkpoint of at least that
size tensor by tensor (hidden 4096, 5 GB shards; one random buffer reused for every weight) and
converts it with quantsave alone, printing the time, the peak RSS and the machine's RAM: the
reference loads whole models and cannot run there.

Usage: python benches/convert_compare.py [--layers 12 24] [--hidden 2048] [--runs 3] [--dir /tmp/qs-convert]
       python benches/convert_compare.py --moe [--layers 14] [--runs 3]
       python benches/convert_compare.py --larger-than-ram 26 [--dir /big/disk]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, shutil, sys, time
import torch
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tool, src, dst = sys.argv[1:4]
shutil.rmtree(dst, ignore_errors=True)
t0 = time.perf_counter()
if tool == "quantsave":
    import quantsave as qs
    qs.convert(src, dst, qs.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
else:
    import transformers
    m = transformers.AutoModelForCausalLM.from_pretrained(
        src, quantization_config=transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
        device_map="cpu",
    )
    m.save_pretrained(dst)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "base_mb": base / 1024, "peak_mb": peak / 1024}))
"""


def build(path: Path, layers: int, hidden: int, moe: bool = False) -> None:
    """Writes the checkpoint from a separate process: peak RSS is inherited by children on Linux,
    so this process must stay small."""
    if (path / "config.json").is_file():
        return
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import convert_compare as c; "
        f"c._build({str(path)!r}, {layers}, {hidden}, {moe})"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _build(path: str, layers: int, hidden: int, moe: bool = False) -> None:
    import torch
    import transformers

    shape = dict(
        vocab_size=32000,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        tie_word_embeddings=False,
    )
    if moe:
        config: object = transformers.MixtralConfig(
            **shape, intermediate_size=hidden * 7 // 4, num_local_experts=8, num_experts_per_tok=2
        )
        cls: type = transformers.MixtralForCausalLM
    else:
        config = transformers.LlamaConfig(**shape, intermediate_size=hidden * 11 // 4)
        cls = transformers.LlamaForCausalLM
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cpu"):
        model = cls(config)
    model.save_pretrained(path)


def build_huge(path: Path, gigabytes: float) -> None:
    """A sharded bf16 Llama checkpoint of at least ``gigabytes``, written without holding it."""
    if (path / "config.json").is_file():
        return
    import torch
    import transformers

    from quantsave import _core

    hidden, inter, vocab = 4096, 11008, 32000
    per_layer = 2 * (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden)
    layers = max(1, int((gigabytes * 1e9 - 4 * vocab * hidden) // per_layer) + 1)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False, dtype="bfloat16",
    )
    config.architectures = ["LlamaForCausalLM"]
    path.mkdir(parents=True, exist_ok=True)
    shapes: dict[str, list[int]] = {"model.embed_tokens.weight": [vocab, hidden], "lm_head.weight": [vocab, hidden]}
    shapes["model.norm.weight"] = [hidden]
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}self_attn.{n}.weight"] = [hidden, hidden]
        shapes[f"{p}mlp.gate_proj.weight"] = [inter, hidden]
        shapes[f"{p}mlp.up_proj.weight"] = [inter, hidden]
        shapes[f"{p}mlp.down_proj.weight"] = [hidden, inter]
        shapes[f"{p}input_layernorm.weight"] = [hidden]
        shapes[f"{p}post_attention_layernorm.weight"] = [hidden]
    torch.manual_seed(0)
    pool = torch.randn(vocab * hidden, dtype=torch.bfloat16)
    limit, shards, current, size = 5 * 10**9, [], [], 0
    for name, shape in shapes.items():
        nbytes = 2 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    names = _core.shard_file_names("model.safetensors", None, len(shards))
    weight_map, total = {}, 0
    for fname, keys in zip(names, shards, strict=True):
        writer = _core.StreamWriter(str(path / fname), [(k, "BF16", shapes[k]) for k in keys], {"format": "pt"})
        for k in keys:
            n = 1
            for d in shapes[k]:
                n *= d
            writer.write(k, pool[:n].view(torch.uint8).numpy())
            weight_map[k] = fname
            total += 2 * n
        writer.finish(fsync=False)
    index = {
        "metadata": {"total_parameters": total // 2, "total_size": total},
        "weight_map": dict(sorted(weight_map.items())),
    }
    if len(shards) > 1:
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config.save_pretrained(path)
    transformers.GenerationConfig.from_model_config(config).save_pretrained(path)


def run(tool: str, src: Path, dst: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, tool, str(src), str(dst)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", help="layer counts (default: 12 24; with --moe: 14)")
    p.add_argument("--hidden", type=int, help="hidden size (default: 2048; with --moe: 1024)")
    p.add_argument("--moe", action="store_true", help="Mixtral-shaped checkpoints (8 experts) instead of Llama")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "qs-convert"))
    p.add_argument(
        "--larger-than-ram", type=float, metavar="GB", help="convert a checkpoint of this size with quantsave alone"
    )
    args = p.parse_args()
    layers_list = args.layers or ([14] if args.moe else [12, 24])
    hidden = args.hidden or (1024 if args.moe else 2048)
    root = Path(args.dir)
    if args.larger_than_ram:
        src = root / f"llama-huge-{args.larger_than_ram:g}gb"
        code = (
            f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import convert_compare as c; "
            f"c.build_huge(c.Path({str(src)!r}), {args.larger_than_ram})"
        )
        subprocess.run([sys.executable, "-c", code], check=True)
        gb = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 1e9
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        ram = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal")) / 1e6
        m = run("quantsave", src, root / "out-huge")
        out_gb = sum(f.stat().st_size for f in (root / "out-huge").glob("*.safetensors")) / 1e9
        print(f"{gb:.1f} GB bf16 checkpoint, {ram:.1f} GB RAM: quantsave nf4 in {m['seconds']:.1f} s, "
              f"peak RSS {m['peak_mb']:.0f} MB (base {m['base_mb']:.0f} MB), output {out_gb:.1f} GB")
        return
    print(f"{'checkpoint':<22}{'tool':<14}{'seconds':>9}{'peak-base MB':>14}{'base MB':>9}")
    for layers in layers_list:
        src = root / f"{'mixtral' if args.moe else 'llama'}-{layers}l-{hidden}"
        build(src, layers, hidden, args.moe)
        gb = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 1e9
        res: dict[str, list[dict[str, float]]] = {"quantsave": [], "transformers": []}
        for _ in range(args.runs):
            for tool in res:
                res[tool].append(run(tool, src, root / f"out-{tool}"))
        med = {t: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for t, rs in res.items()}
        for tool, m in med.items():
            print(
                f"{f'{gb:.2f} GB bf16' + (' MoE' if args.moe else ''):<22}{tool:<14}{m['seconds']:>9.2f}"
                f"{m['peak_mb'] - m['base_mb']:>14.0f}{m['base_mb']:>9.0f}"
            )
        print(
            "  speed ratio (transformers / quantsave): "
            f"{med['transformers']['seconds'] / med['quantsave']['seconds']:.1f}x"
        )
    print("targets: >= 10x at ~1.5 GB, >= 15x at ~3 GB; quantsave peak grows <= 10% from 1.5 to 3 GB, < base + 0.5 GB")


if __name__ == "__main__":
    main()
