"""Original single-file checkpoints made in the tests (and ``benches/single_file.py``): a
diffusers state dict written back under the original keys that diffusers' single-file converter
reads (its mapping inverted by hand for the tiny configs the tests build), or random tensors
under an original key layout."""

from __future__ import annotations

from pathlib import Path

import torch


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def sd3_original(sd: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """An SD3 transformer's diffusers state dict under the keys of SD3's original checkpoint
    (``convert_sd3_transformer_checkpoint_to_diffusers`` inverted; no dual attention, no qk norm)."""
    p = "model.diffusion_model."
    out = {
        "pos_embed": sd["pos_embed.pos_embed"],
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
        "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "t_embedder.mlp.0.weight": sd["time_text_embed.timestep_embedder.linear_1.weight"],
        "t_embedder.mlp.0.bias": sd["time_text_embed.timestep_embedder.linear_1.bias"],
        "t_embedder.mlp.2.weight": sd["time_text_embed.timestep_embedder.linear_2.weight"],
        "t_embedder.mlp.2.bias": sd["time_text_embed.timestep_embedder.linear_2.bias"],
        "context_embedder.weight": sd["context_embedder.weight"],
        "context_embedder.bias": sd["context_embedder.bias"],
        "y_embedder.mlp.0.weight": sd["time_text_embed.text_embedder.linear_1.weight"],
        "y_embedder.mlp.0.bias": sd["time_text_embed.text_embedder.linear_1.bias"],
        "y_embedder.mlp.2.weight": sd["time_text_embed.text_embedder.linear_2.weight"],
        "y_embedder.mlp.2.bias": sd["time_text_embed.text_embedder.linear_2.bias"],
        "final_layer.linear.weight": sd["proj_out.weight"],
        "final_layer.linear.bias": sd["proj_out.bias"],
        "final_layer.adaLN_modulation.1.weight": _swap_halves(sd["norm_out.linear.weight"]),
        "final_layer.adaLN_modulation.1.bias": _swap_halves(sd["norm_out.linear.bias"]),
    }
    for i in range(num_layers):
        d, o = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        last = i == num_layers - 1
        for part in ("weight", "bias"):
            out[f"{o}x_block.attn.qkv.{part}"] = torch.cat([sd[f"{d}attn.to_{x}.{part}"] for x in "qkv"])
            out[f"{o}context_block.attn.qkv.{part}"] = torch.cat([sd[f"{d}attn.add_{x}_proj.{part}"] for x in "qkv"])
            out[f"{o}x_block.attn.proj.{part}"] = sd[f"{d}attn.to_out.0.{part}"]
            out[f"{o}x_block.adaLN_modulation.1.{part}"] = sd[f"{d}norm1.linear.{part}"]
            context = sd[f"{d}norm1_context.linear.{part}"]
            out[f"{o}context_block.adaLN_modulation.1.{part}"] = _swap_halves(context) if last else context
            out[f"{o}x_block.mlp.fc1.{part}"] = sd[f"{d}ff.net.0.proj.{part}"]
            out[f"{o}x_block.mlp.fc2.{part}"] = sd[f"{d}ff.net.2.{part}"]
            if not last:
                out[f"{o}context_block.attn.proj.{part}"] = sd[f"{d}attn.to_add_out.{part}"]
                out[f"{o}context_block.mlp.fc1.{part}"] = sd[f"{d}ff_context.net.0.proj.{part}"]
                out[f"{o}context_block.mlp.fc2.{part}"] = sd[f"{d}ff_context.net.2.{part}"]
    return {p + k: v.contiguous() for k, v in out.items()}


#: Flux's widths, which diffusers' Flux converter fixes (inner dim 3072, mlp ratio 4).
FLUX_H, FLUX_MLP, FLUX_CTX, FLUX_POOLED, FLUX_IN = 3072, 12288, 4096, 768, 64


def flux_original_shapes(double: int, single: int) -> dict[str, list[int]]:
    """The tensors of an original (BFL) Flux transformer file with ``double`` double-stream and
    ``single`` single-stream blocks, guidance embedding included."""
    h, mlp = FLUX_H, FLUX_MLP
    shapes: dict[str, list[int]] = {}

    def linear(name: str, out: int, inp: int) -> None:
        shapes[f"{name}.weight"] = [out, inp]
        shapes[f"{name}.bias"] = [out]

    for emb, inp in (("time_in", 256), ("guidance_in", 256), ("vector_in", FLUX_POOLED)):
        linear(f"{emb}.in_layer", h, inp)
        linear(f"{emb}.out_layer", h, h)
    linear("txt_in", h, FLUX_CTX)
    linear("img_in", h, FLUX_IN)
    for i in range(double):
        for stream in ("img", "txt"):
            b = f"double_blocks.{i}.{stream}"
            linear(f"{b}_mod.lin", 6 * h, h)
            linear(f"{b}_attn.qkv", 3 * h, h)
            linear(f"{b}_attn.proj", h, h)
            shapes[f"{b}_attn.norm.query_norm.scale"] = [128]
            shapes[f"{b}_attn.norm.key_norm.scale"] = [128]
            linear(f"{b}_mlp.0", mlp, h)
            linear(f"{b}_mlp.2", h, mlp)
    for i in range(single):
        b = f"single_blocks.{i}"
        linear(f"{b}.linear1", 3 * h + mlp, h)
        linear(f"{b}.linear2", h, h + mlp)
        linear(f"{b}.modulation.lin", 3 * h, h)
        shapes[f"{b}.norm.query_norm.scale"] = [128]
        shapes[f"{b}.norm.key_norm.scale"] = [128]
    linear("final_layer.linear", FLUX_IN, h)
    linear("final_layer.adaLN_modulation.1", 2 * h, h)
    return shapes


def write_flux_original(folder: Path, double: int, single: int, seed: int = 0) -> Path:
    """An original bf16 Flux file of random values (``folder/flux.safetensors``) and its
    diffusers config (``folder/config``); kept when already there."""
    file = folder / "flux.safetensors"
    if file.is_file() and (folder / "config" / "config.json").is_file():
        return file
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    FluxTransformer2DModel.from_config(
        {"num_layers": double, "num_single_layers": single, "guidance_embeds": True}
    ).save_config(folder / "config")
    g = torch.Generator().manual_seed(seed)
    shapes = flux_original_shapes(double, single)
    save_file({k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}, file)
    return file
