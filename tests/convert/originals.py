"""Original single-file checkpoints made in the tests: a diffusers state dict written back under
the original keys that diffusers' single-file converter reads (its mapping inverted by hand for
the tiny configs the tests build)."""

from __future__ import annotations

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
