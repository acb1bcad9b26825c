"""An original Flux single file to an nf4 diffusers folder: ``quantsave.convert(file, dst,
model_class="FluxTransformer2DModel", model_config=...)`` against the reference,
``FluxTransformer2DModel.from_single_file(file, config=..., quantization_config=nf4)`` +
``save_pretrained``, each in its own process; prints each one's peak RSS (VmHWM: the most memory
the process held at once, the file's mapped pages included), the RSS after imports, the time,
and the ratio. Both outputs' weights are checked identical.

The file holds Flux's original keys (``double_blocks.*``, ``single_blocks.*``, fused qkv) at its
real widths (diffusers' converter fixes the inner dim at 3072) with 1 double and 2 single blocks:
about 1.4 GB in bf16, random values.

diffusers 0.42's ``from_single_file`` makes its bitsandbytes quantizer as if the file were
already quantized (and fails: "Missing quantization component"); the reference here is that call
with ``pre_quantized=False`` (what ``from_pretrained`` passes for a float checkpoint).

Usage: python benches/single_file.py [--dir /tmp/qs-single] [--runs 1] [--double 1] [--single 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

# The original Flux key layout is the tests' (tests/convert/originals.py).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "convert"))

from originals import write_flux_original

CHILD = r"""
import json, sys, time, resource
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0
import torch, diffusers
import quantsave as qs
side, file, config, out = sys.argv[1:5]
qc = diffusers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
if side == "reference":
    from diffusers.quantizers.bitsandbytes import bnb_quantizer
    from diffusers.loaders import single_file_model
    for cls in (bnb_quantizer.BnB4BitDiffusersQuantizer, bnb_quantizer.BnB8BitDiffusersQuantizer):
        cls.validate_environment = lambda self, *a, **k: None
    make = single_file_model.DiffusersAutoQuantizer.from_config
    class Fixed:
        @staticmethod
        def from_config(c, **kw):
            return make(c, pre_quantized=False, **kw)
    single_file_model.DiffusersAutoQuantizer = Fixed
base = rss("VmRSS:")
t0 = time.perf_counter()
if side == "reference":
    m = diffusers.FluxTransformer2DModel.from_single_file(file, config=config, quantization_config=qc,
                                                          torch_dtype=torch.bfloat16)
    m.save_pretrained(out)
else:
    qs.convert(file, out, qc, torch_dtype=torch.bfloat16, model_class="FluxTransformer2DModel", model_config=config,
               progress=False)
print(json.dumps({"seconds": time.perf_counter() - t0, "peak": rss("VmHWM:"), "base": base}))
"""


def run(side: str, file: Path, config: Path, out: Path) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, side, str(file), str(config), str(out)], capture_output=True, text=True
    )
    if done.returncode != 0:
        sys.exit(f"{side} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(a / "diffusion_pytorch_model.safetensors"), load_file(b / "diffusion_pytorch_model.safetensors")
    return x.keys() == y.keys() and all(bool((x[k] == y[k]).all()) for k in x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/qs-single")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--double", type=int, default=1)
    parser.add_argument("--single", type=int, default=2)
    args = parser.parse_args()
    folder = Path(args.dir)
    file = write_flux_original(folder, args.double, args.single)
    size = file.stat().st_size
    print(f"source: {file} ({size / 1e9:.2f} GB)")
    results: dict[str, list[dict[str, float]]] = {"quantsave": [], "reference": []}
    for _ in range(args.runs):
        for side in results:
            results[side].append(run(side, file, folder / "config", folder / side))
    if not same_weights(folder / "quantsave", folder / "reference"):
        sys.exit("the two outputs' weights differ")
    med = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for s, rs in results.items()}
    for side, m in med.items():
        print(f"{side:>10}: peak RSS {m['peak'] / 1e9:.2f} GB ({m['peak'] / size:.2f}x the file; "
              f"{m['base'] / 1e9:.2f} GB after imports), {m['seconds']:.1f} s")  # fmt: skip
    q, r = med["quantsave"], med["reference"]
    print(f"peak RSS reference / quantsave: {r['peak'] / q['peak']:.2f}x; above the imports: "
          f"{(r['peak'] - r['base']) / max(q['peak'] - q['base'], 1):.2f}x; time reference / quantsave: "
          f"{r['seconds'] / q['seconds']:.2f}x; weights identical")  # fmt: skip


if __name__ == "__main__":
    main()
