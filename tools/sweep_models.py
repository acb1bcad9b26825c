"""The sweep's models: which transformers model types and diffusers classes it covers, the rules
that shrink a library default config to a tiny one, the per-type overrides, and the small init
arguments and inputs of each diffusers class. Data only (plus the few functions that apply it);
``tools/sweep.py`` runs the cases."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from conftest import TINY_UNET, sd3_kwargs

#: Attribute names and the value they are shrunk to (only ever shrunk: a smaller default stays).
#: Applied to a transformers config and to each of its sub-configs (text_config, vision_config,
#: encoder, decoder, ...).
SHRINK: dict[str, int] = {
    # layer counts
    **dict.fromkeys(
        [
            "num_hidden_layers", "num_layers", "n_layer", "n_layers", "num_decoder_layers", "num_encoder_layers",
            "encoder_layers", "decoder_layers", "depth", "num_blocks", "conf_num_hidden_layers",
            "num_global_layers", "n_recurrent_layers", "num_layers_per_stack", "n_input_layers",
            "n_output_layers",
        ],
        2,
    ),
    # widths
    **dict.fromkeys(
        [
            "hidden_size", "d_model", "n_embd", "embed_dim", "emb_dim", "embedding_dim", "model_dim",
            "embedding_size", "input_embedding_size", "output_embedding_size", "word_embed_proj_dim",
            "lru_width", "backbone_hidden_size", "hidden_size_global",
            "out_hidden_size", "vision_output_dim", "projector_input_dim", "projector_output_dim",
            "adapter_in_dim", "adapter_input_size",
        ],
        64,
    ),
    **dict.fromkeys(
        [
            "num_attention_heads", "n_head", "n_heads", "num_heads", "attention_heads", "encoder_attention_heads",
            "decoder_attention_heads", "num_decoder_attention_heads", "num_encoder_attention_heads",
            "conf_num_attention_heads", "swa_num_attention_heads", "linear_num_heads", "linear_num_value_heads",
        ],
        4,
    ),
    **dict.fromkeys(
        [
            "num_key_value_heads", "num_kv_heads", "num_query_groups", "swa_num_key_value_heads",
            "linear_num_key_heads", "index_n_heads",
        ],
        2,
    ),
    # (a key/value head count equal to its query head count by default stays equal: see KV_HEADS)
    **dict.fromkeys(
        [
            "head_dim", "d_kv", "attention_head_size", "d_head", "dim_head", "hidden_size_per_layer_input",
            "laurel_rank",
            "swa_head_dim", "linear_head_dim", "linear_key_head_dim", "linear_value_head_dim", "index_head_dim",
            "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "mamba_d_head", "mamba_head_dim",
            "mamba_headdim",
        ],
        16,
    ),
    "rotary_dim": 8,
    **dict.fromkeys(["kv_lora_rank", "q_lora_rank", "o_lora_rank"], 32),
    **dict.fromkeys(
        [
            "intermediate_size", "d_ff", "ffn_dim", "n_inner", "encoder_ffn_dim", "decoder_ffn_dim",
            "ffn_hidden_size", "dim_ff", "dff", "feed_forward_size", "dense_intermediate_size", "mlp_dim",
            "intermediate_size_mlp", "d_inner",
        ],
        128,
    ),
    **dict.fromkeys(
        [
            "moe_intermediate_size", "shared_expert_intermediate_size", "shared_experts_intermediate_size",
            "shared_intermediate_size", "moe_shared_expert_intermediate_size", "expert_ffn_hidden_size",
        ],
        64,
    ),
    # experts
    **dict.fromkeys(
        ["num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "zero_expert_num"], 4
    ),
    **dict.fromkeys(
        ["num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "index_topk"], 2
    ),
    **dict.fromkeys(["n_group", "topk_group", "num_expert_group"], 1),
    "first_k_dense_replace": 1,
    # state-space and recurrent blocks
    **dict.fromkeys(["mamba_d_state", "state_size", "ssm_state_size"], 16),
    **dict.fromkeys(["mamba_dt_rank", "time_step_rank"], 8),
    **dict.fromkeys(["mamba_n_heads", "mamba_num_heads", "n_mamba_heads"], 8),
    **dict.fromkeys(["mamba_chunk_size", "chunk_size"], 16),
    # sequence lengths and vocabularies
    **dict.fromkeys(
        ["max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_target_positions", "context_length"],
        128,
    ),
    **dict.fromkeys(
        [
            "vocab_size", "audio_vocab_size", "decoder_vocab_size", "unpadded_vocab_size", "vocab_size_per_layer_input",
            "pronunciation_vocab_size", "shape_vocab_size",
        ],
        256,
    ),
    **dict.fromkeys(["sliding_window", "sliding_window_size", "attention_window_size", "attention_chunk_size"], 16),
    # vision towers (never fed here, only built)
    "image_size": 32,
    "patch_size": 8,
    "num_position_embeddings": 16,
}

#: Key/value head counts and the query head count they pair with: where the default has them
#: equal (no grouped-query attention, or MLA), the shrunk config keeps them equal.
KV_HEADS: dict[str, str] = {
    "num_key_value_heads": "num_attention_heads",
    "num_kv_heads": "num_attention_heads",
    "swa_num_key_value_heads": "swa_num_attention_heads",
    "linear_num_key_heads": "linear_num_value_heads",
}

#: Config keys naming token ids: moved inside the shrunk vocabulary (counted down from its top).
TOKEN_ID_SUFFIXES = ("_token_id", "_token_index", "_index")

QWEN4_EXP_TEXT = {
    "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 4,
    "indexer_compress_ratio": 2, "hc_lowrank": 16, "ple_embed_dim": 64, "ngram_vocab_size_base": 256,
    "split_ngram_parts": 4, "heads_per_ngram": 2,
}

#: Per model type: values given to the config after the rules (a nested dict sets a sub-config's
#: keys).
OVERRIDES: dict[str, dict[str, Any]] = {
    # hybrids: the two layers are one of each kind (attention and state-space / linear / conv)
    "bamba": {"attn_layer_indices": [1], "mamba_d_head": 16},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"], "mamba_d_head": 16},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "zamba": {"num_hidden_layers": 3, "layers_block_type": ["linear_attention", "hybrid", "hybrid"]},
    # (dory's config counts an attention and an mlp block per layer: these are 3 layers)
    "dory": {
        "num_hidden_layers": 6, "n_input_layers": 2, "n_recurrent_layers": 2, "n_output_layers": 2,
        "layer_types": ["sliding_attention", "mlp", "full_attention", "mlp", "sliding_attention", "mlp"],
    },
    "mamba2": {"num_heads": 8},
    # library defaults that leave a required size unset
    "hunyuan_v1_dense": {"head_dim": 16},
    "hunyuan_v1_moe": {"head_dim": 16},
    "ministral": {"head_dim": 16},
    "nemotron": {"num_key_value_heads": 2},
    "dots1": {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1},
    "gemma4_assistant": {"hidden_size_per_layer_input": 0},
    "gemma3n_text": {"num_kv_shared_layers": 0},
    "deepseek_v2": {"num_experts_per_tok": 2},
    "dots3_note_text": {
        "swa_num_attention_heads": 4, "swa_num_key_value_heads": 4, "swa_q_lora_rank": 32, "swa_kv_lora_rank": 32,
        "swa_head_dim": 32, "swa_qk_nope_head_dim": 16, "swa_v_head_dim": 16,
    },
    "hrm_text": {"num_layers_per_stack": 1},
    "blt": {"vocab_size": 260},
    "xmod": {"default_language": "en_XX"},
    "reformer": {"is_decoder": True, "axial_pos_embds_dim": [32, 32], "axial_pos_shape": [8, 16]},
    "qwen4_exp": {"text_config": QWEN4_EXP_TEXT},
    "qwen4_exp_text": QWEN4_EXP_TEXT,
}

#: The encoder and encoder-decoder families taken from ``MODEL_MAPPING_NAMES``, built with
#: ``AutoModel`` and named ``model:<type>``: the text encoders pipelines use (BERT family, CLIP
#: text, T5) and the common encoder-decoders (T5 family, BART family). Values: config overrides.
ENCODERS: dict[str, dict[str, Any]] = {
    "bert": {},
    "roberta": {},
    "xlm-roberta": {},
    "deberta": {},
    "deberta-v2": {},
    "distilbert": {},
    "electra": {},
    "albert": {},
    "mpnet": {},
    "modernbert": {},
    "clip_text_model": {},
    "t5": {},
    "umt5": {},
    "mt5": {},
    "bart": {},
    "mbart": {},
    "pegasus": {},
}

#: Entries built with a named class rather than an auto class: (model type, class name).
CLASSES: dict[str, tuple[str, str]] = {
    "t5-encoder": ("t5", "T5EncoderModel"),
}

#: Models whose forward needs more than ``input_ids`` (and ``decoder_input_ids`` for an
#: encoder-decoder): their load column compares tensors only.
NO_INPUTS: dict[str, str] = {}


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _layer_count(values: dict[str, Any]) -> int | None:
    for key in ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "depth"):
        if _is_count(values.get(key)):
            return int(values[key])
    return None


def _spread(items: list[Any], n: int) -> list[Any]:
    """A per-layer list cut to ``n`` entries keeping each distinct kind once where it fits."""
    kinds: list[Any] = []
    for item in items:
        if item not in kinds:
            kinds.append(item)
    out = kinds[:n]
    return out + [items[-1]] * (n - len(out))


def _token_ids(values: dict[str, Any], vocab: int, moved: dict[int, int]) -> dict[str, Any]:
    def move(v: int) -> int:
        if v < vocab:
            return v
        if v not in moved:
            moved[v] = vocab - 1 - len(moved)
        return moved[v]

    out: dict[str, Any] = {}
    for key, value in values.items():
        if not key.endswith(TOKEN_ID_SUFFIXES):
            continue
        if _is_count(value) and value >= vocab:
            out[key] = move(value)
        elif isinstance(value, list) and value and all(_is_count(v) for v in value):
            new = [move(v) for v in value]
            if new != value:
                out[key] = new
    return out


def shrink_changes(values: dict[str, Any]) -> dict[str, Any]:
    """The keys of one config level (its ``to_dict()``) that the rules change, with new values:
    the rules, token ids moved into the vocabulary, per-layer lists cut to the new layer count."""
    out: dict[str, Any] = {k: SHRINK[k] for k, v in values.items() if k in SHRINK and _is_count(v) and v > SHRINK[k]}
    out.update(
        {
            k: [min(x, SHRINK[k]) for x in v]
            for k, v in values.items()
            if k in SHRINK and isinstance(v, list) and v and all(_is_count(x) for x in v) and max(v) > SHRINK[k]
        }
    )
    for kv, q in KV_HEADS.items():
        if kv in out and values[kv] == values.get(q) and q in out:
            out[kv] = out[q]
    old, new = _layer_count(values), _layer_count({**values, **out})
    if old is not None and new is not None and new < old:
        out.update({k: _spread(out.get(k, v), new) for k, v in values.items() if isinstance(v, list) and len(v) == old})
    vocab: Any = out.get("vocab_size", values.get("vocab_size"))
    out.update(_token_ids(values, vocab if _is_count(vocab) else SHRINK["vocab_size"], {}))
    return out


def per_layer_changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Per-layer lists the config kept at the old layer count after the count shrank."""
    old, new = _layer_count(before), _layer_count(after)
    if old is None or new is None or old == new:
        return {}
    return {k: _spread(v, new) for k, v in after.items() if isinstance(v, list) and len(v) == old != new}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def tiny_config(model_type: str, overrides: dict[str, Any] | None = None) -> Any:
    """``CONFIG_MAPPING[model_type]()`` shrunk by the rules (config and sub-configs), then
    ``overrides`` (nested dicts set a sub-config's keys)."""
    from transformers import CONFIG_MAPPING, PretrainedConfig

    cls = CONFIG_MAPPING[model_type]
    try:
        default = cls()
    except Exception:  # noqa: BLE001 - a default the library's own validation rejects: the overrides make it valid
        default = cls(**(overrides or {}))
    subs = [k for k, v in vars(default).items() if isinstance(v, PretrainedConfig)]

    def changes(config: Any) -> dict[str, Any]:
        top = shrink_changes(config.to_dict())
        for name in subs:
            sub = getattr(config, name)
            top[name] = {"model_type": sub.model_type, **shrink_changes(sub.to_dict())}
        return top

    kwargs = _merge(changes(default), overrides or {})
    config = cls(**kwargs)
    extra = per_layer_changes(default.to_dict(), config.to_dict())
    for name in subs:
        sub_extra = per_layer_changes(getattr(default, name).to_dict(), getattr(config, name).to_dict())
        if sub_extra:
            extra[name] = sub_extra
    if extra:
        config = cls(**_merge(kwargs, _merge(extra, overrides or {})))
    return config


def transformers_models() -> list[str]:
    """Every causal-LM model type of transformers, then ``model:<type>`` per encoder family,
    then the named-class entries."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return [*sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), *(f"model:{t}" for t in ENCODERS), *CLASSES]


def transformers_class(name: str) -> str:
    """The transformers class (or auto class) that loads the entry."""
    if name in CLASSES:
        return CLASSES[name][1]
    return "AutoModel" if name.startswith("model:") else "AutoModelForCausalLM"


def build_transformers(name: str) -> Any:
    transformers: Any = importlib.import_module("transformers")

    if name in CLASSES:
        model_type, cls_name = CLASSES[name]
        return getattr(transformers, cls_name)(tiny_config(model_type, OVERRIDES.get(model_type)))
    if name.startswith("model:"):
        model_type = name.removeprefix("model:")
        return transformers.AutoModel.from_config(tiny_config(model_type, ENCODERS[model_type]))
    return transformers.AutoModelForCausalLM.from_config(tiny_config(name, OVERRIDES.get(name)))


def transformers_inputs(name: str) -> str | None:
    """``"ids"`` (input_ids; also decoder_input_ids for an encoder-decoder) or None."""
    return None if name in NO_INPUTS else "ids"


# ----------------------------------------------------------------------------------------------
# diffusers

#: Init arguments shrunk from a class's signature defaults (ints, and each entry of a tuple of
#: ints), before the per-class arguments in DIFFUSERS.
DIFFUSERS_SHRINK: dict[str, int] = {
    "num_layers": 2,
    **dict.fromkeys(
        [
            "num_hidden_layers", "n_layers", "depth", "nlayers", "num_single_layers", "num_mmdit_layers",
            "num_single_dit_layers", "num_refiner_layers", "n_refiner_layers", "num_visual_blocks",
            "num_text_blocks", "decoder_num_layers", "encoder_num_hidden_layers", "decoder_num_hidden_layers",
            "num_lyric_encoder_hidden_layers", "num_timbre_encoder_hidden_layers",
            "num_attention_pooler_hidden_layers", "layers_per_block", "transformer_layers_per_block",
            "encoder_layers_per_block", "decoder_layers_per_block", "num_res_blocks", "layers_per_down_block",
            "layers_per_up_block", "temporal_transformer_layers_per_block",
        ],
        1,
    ),
    **dict.fromkeys(
        [
            "num_attention_heads", "n_heads", "nheads", "num_heads", "attn_num_heads", "decoder_num_attention_heads",
            "audio_num_attention_heads", "num_cross_attention_heads", "motion_num_attention_heads",
            "addition_embed_type_num_heads",
        ],
        2,
    ),
    **dict.fromkeys(["num_key_value_heads", "num_kv_heads", "n_kv_heads"], 2),
    **dict.fromkeys(
        [
            "attention_head_dim", "head_dim", "cross_attention_head_dim", "audio_attention_head_dim",
            "decoder_attention_head_dim", "dim_heads", "adaln_lora_dim",
        ],
        16,
    ),
    **dict.fromkeys(
        [
            "hidden_size", "model_dim", "dim", "inner_dim", "decoder_hidden_size", "token_dim", "cross_attention_dim",
            "joint_attention_dim", "text_embed_dim", "text_dim", "pooled_projection_dim", "caption_channels",
            "caption_projection_dim", "cap_feat_dim", "text_hidden_dim", "in_text_dim", "in_text_dim2",
            "condition_dim", "context_in_dim", "cross_attention_dim_t5", "audio_cross_attention_dim", "source_dim",
            "target_dim", "dim_cond", "time_embed_dim", "freq_dim", "encoder_hidden_size", "fsq_dim",
            "timbre_hidden_dim", "audio_acoustic_hidden_dim",
        ],
        32,
    ),
    **dict.fromkeys(["intermediate_size", "ffn_dim", "ff_dim", "decoder_intermediate_size"], 64),
    **dict.fromkeys(
        [
            "block_out_channels", "encoder_block_out_channels", "decoder_block_out_channels",
            "down_block_out_channels", "up_block_out_channels", "decode_block_out_channels", "base_dim",
            "decoder_base_dim", "ch", "base_channels", "conditioning_embedding_out_channels",
        ],
        32,
    ),
    "norm_num_groups": 8,
    **dict.fromkeys(["vocab_size", "target_vocab_size"], 256),
    **dict.fromkeys(["sample_height", "sample_width"], 8),
}

#: Rotary axis splits: their entries must add up to the (shrunk) head dimension, 16.
ROPE_AXES = {"axes_dims_rope", "rope_axes_dim", "axes_dims", "rope_dim_list", "axes_dim_rope"}
ROPE_SPLITS = {1: (16,), 2: (8, 8), 3: (4, 6, 6), 4: (4, 4, 4, 4)}


def _shrunk(key: str, value: Any) -> Any:
    if key in ROPE_AXES and isinstance(value, (tuple, list)) and len(value) in ROPE_SPLITS:
        return type(value)(ROPE_SPLITS[len(value)])
    target = DIFFUSERS_SHRINK.get(key)
    if target is None:
        return value
    if _is_count(value):
        return min(value, target)
    if isinstance(value, (tuple, list)) and value and all(_is_count(v) for v in value):
        return type(value)(min(v, target) for v in value)
    return value


def diffusers_kwargs(name: str) -> dict[str, Any]:
    """The class's signature defaults shrunk by the rules, then its entry in DIFFUSERS."""
    import inspect

    import diffusers

    cls = getattr(diffusers, name.split(":")[0])
    out: dict[str, Any] = {}
    for key, p in inspect.signature(cls.__init__).parameters.items():
        if p.default is inspect.Parameter.empty or key in ("self", "kwargs", "args"):
            continue
        new = _shrunk(key, p.default)
        if new is not p.default and new != p.default:
            out[key] = new
    out.update(DIFFUSERS.get(name) or {})
    return out


#: diffusers classes and their per-class init arguments (after the rules). A name may carry a
#: variant after a colon (``UNet2DConditionModel:sdxl``); the class is the part before it.
DIFFUSERS: dict[str, dict[str, Any]] = {
    "SD3Transformer2DModel": sd3_kwargs(),
    "UNet2DModel": dict(TINY_UNET),
    "UNet2DConditionModel": dict(
        sample_size=8, block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        layers_per_block=1, norm_num_groups=8,
    ),
    "UNet2DConditionModel:sdxl": dict(
        sample_size=8, block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=(2, 4),
        layers_per_block=1, norm_num_groups=8, transformer_layers_per_block=(1, 2), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
    ),
    "AutoencoderKL": dict(
        sample_size=16, block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
    ),
    "ChromaTransformer2DModel": dict(approximator_hidden_dim=32, approximator_layers=1),
    "AutoencoderSAME": dict(encoder_channels=16, encoder_transformer_depths=(1,), latent_dim=16),
    "AutoencoderKLKVAEAudio": dict(latent_dim=32, decoder_dim=32, encoder_dim=16, codebook_dim=16),
    "AutoencoderKLMiniMaxH3Audio": dict(latent_dim=32, decoder_dim=256, encoder_dim=16),
    "LTX2VideoDiffusionDecoderModel": dict(
        decoder_stage_channels=(128, 64, 32, 32, 16), decoder_head_dim=16, decoder_stage_depths=(1, 1, 1, 1, 1),
        decoder_t_emb_dim=32,
        latent_channels=16,
    ),
    "LongCatAudioDiTTransformer": dict(dit_dim=32, dit_depth=2, dit_heads=2, dit_text_dim=32, latent_dim=16),
    "StableAudio3DiTModel": dict(
        io_channels=16, embed_dim=32, depth=2, num_heads=2, cond_token_dim=32, global_cond_dim=32,
        local_add_cond_dim=17, timestep_features_dim=32, num_memory_tokens=4,
    ),
    "T5FilmDecoder": dict(input_dims=16, targets_length=16, d_model=32, num_layers=2, num_heads=2, d_kv=16, d_ff=64),
    "WanAnimateTransformer3DModel": dict(
        image_dim=32, motion_encoder_size=16, motion_style_dim=16, motion_dim=8, motion_encoder_dim=16,
        face_encoder_hidden_dim=32, face_encoder_num_heads=2, inject_face_latents_blocks=1,
    ),
    "ReduxImageEncoder": dict(redux_dim=32, txt_in_features=32),
    "ControlNetXSAdapter": dict(
        conditioning_embedding_out_channels=(8, 16), block_out_channels=(4, 8), base_block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), num_attention_heads=2, cross_attention_dim=32,
        sample_size=8, max_norm_num_groups=4,
    ),
    "CosmosControlNetModel": dict(
        n_controlnet_blocks=1, model_channels=32, img_context_dim_out=32, crossattn_proj_in_channels=32,
        encoder_hidden_states_channels=32, in_channels=20,
    ),
    "UVit2DModel": dict(
        hidden_size=32, cond_embed_dim=32, micro_cond_encode_dim=16, micro_cond_embed_dim=80, encoder_hidden_size=32,
        vocab_size=72, codebook_size=64, in_channels=32, block_out_channels=32, block_num_heads=2,
    ),
    "StableCascadeUNet": dict(
        conditioning_dim=32, block_out_channels=(32, 32), num_attention_heads=(2, 2), down_num_layers_per_block=(1, 1),
        up_num_layers_per_block=(1, 1), clip_text_pooled_in_channels=32, timestep_ratio_embedding_dim=16,
    ),
    "HunyuanVideo15Transformer3DModel": dict(text_embed_2_dim=32, image_embed_dim=32),
    "AutoencoderKLHunyuanImage": dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32), layers_per_block=1,
        spatial_compression_ratio=2, sample_size=16,
    ),
    "ControlNetUnionModel": dict(
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=32,
        conditioning_embedding_out_channels=(8, 16), num_trans_channel=32, num_trans_head=2, num_proj_channel=32,
        attention_head_dim=8, addition_time_embed_dim=8,
    ),
    "DreamLiteTransformer2DModel": dict(in_channels=32),
    # (its dense MLP width is dim * 8/3 rounded down to 128: dim 128; five layers for one MoE block)
    "NucleusMoEImageTransformer2DModel": dict(
        attention_head_dim=64, axes_dims_rope=(16, 24, 24), num_layers=5, num_experts=4, moe_intermediate_dim=32
    ),
    "PixArtTransformer2DModel": dict(sample_size=8),
    "CogVideoXTransformer3DModel": dict(max_text_seq_length=5),
    "EasyAnimateTransformer3DModel": dict(in_channels=4, out_channels=4, patch_size=2, mmdit_layers=2),
    "HiDreamImageTransformer2DModel": dict(
        patch_size=2, caption_channels=[32, 32], text_emb_dim=32, llama_layers=[0, 1]
    ),
    "HunyuanDiT2DModel": dict(in_channels=4, patch_size=2, hidden_size=32),
    "HunyuanDiT2DControlNetModel": dict(in_channels=4, patch_size=2, hidden_size=32),
    "Kandinsky3UNet": dict(groups=8, time_embedding_dim=32, block_out_channels=(32, 64), encoder_hid_dim=32),
    "Krea2Transformer2DModel": dict(
        text_num_attention_heads=2, text_num_key_value_heads=2, text_intermediate_size=64, num_text_layers=1,
    ),
    "LatteTransformer3DModel": dict(in_channels=4, patch_size=2, sample_size=8, video_length=2, caption_channels=32),
    "LuminaNextDiT2DModel": dict(multiple_of=16, sample_size=8, num_kv_heads=2),
    "OmniGenTransformer2DModel": dict(
        pad_token_id=0, max_position_embeddings=256, original_max_position_embeddings=64,
        rope_scaling={"short_factor": [1.0] * 8, "long_factor": [1.0] * 8},
    ),
    "PRXTransformer2DModel": dict(axes_dim=[8, 8]),
    "Transformer2DModel": dict(in_channels=32),
    "TransformerTemporalModel": dict(in_channels=32),
    "UniDiffuserModel": dict(sample_size=8, patch_size=2, in_channels=4, text_dim=32, clip_img_dim=32),
    "WanVACETransformer3DModel": dict(vace_layers=[0], vace_in_channels=16),
    "ZImageControlNetModel": dict(
        control_layers_places=[0], control_refiner_layers_places=[0], control_in_dim=16,
        add_control_noise_refiner=False,
    ),
}

#: Exported ``ModelMixin`` classes the sweep leaves out, and why.
DIFFUSERS_LEFT_OUT: dict[str, str] = {
    **dict.fromkeys(
        [
            "FluxMultiControlNetModel", "HunyuanDiT2DMultiControlNetModel", "MultiAdapter", "MultiControlNetModel",
            "QwenImageMultiControlNetModel", "SD3MultiControlNetModel",
        ],
        "a container of other models (built from a list of them)",
    ),
    **dict.fromkeys(
        [
            "AutoencoderDC", "AutoencoderKLCogVideoX", "AutoencoderKLCosmos", "AutoencoderKLHunyuanImageRefiner",
            "AutoencoderKLHunyuanVideo15", "AutoencoderKLKVAE", "AutoencoderKLKVAEVideo", "AutoencoderKLLTX2Audio",
            "AutoencoderKLLTX2Video", "AutoencoderKLLTXVideo", "AutoencoderKLMagvit", "AutoencoderKLQwenImage",
            "AutoencoderKLQwenImage21", "AutoencoderKLWan", "AutoencoderOobleck", "AutoencoderTiny",
            "AutoencoderVidTok",
            "Cosmos3AVAEAudioTokenizer", "Kandinsky6SRLatentUpscalerBank", "Kandinsky6SRVAE", "LongCatAudioDiTVae",
            "MMAudioVAE", "MMAudioVocoder", "MiniMaxMusic3ConditionEncoder", "MiniMaxMusic3Vocoder", "T2IAdapter",
            "AutoencoderKLHunyuanImage",
        ],
        "no nn.Linear layer (convolutions only): nothing for bitsandbytes to quantize",
    ),
    "AudioLDM2ProjectionModel": "a projection between text encoders, built only with a pipeline's dimensions",
    "StableAudioProjectionModel": "a projection between text encoders, built only with a pipeline's dimensions",
    "RFD4ProteinaAutoencoder": "needs protein tables (atom37_mask, allowed_residue_types) as init arguments",
    "UniDiffuserTextDecoder": "a GPT-2 wrapper built from a pipeline's prefix dimensions",
}


def diffusers_models() -> list[str]:
    """Every exported ``ModelMixin`` subclass not left out, plus the table's variants."""
    import inspect

    import diffusers

    names = []
    for name in sorted(dir(diffusers)):
        try:
            obj = getattr(diffusers, name)
        except Exception:  # noqa: BLE001 - an optional backend's class that cannot import
            continue
        if inspect.isclass(obj) and issubclass(obj, diffusers.ModelMixin) and obj is not diffusers.ModelMixin:
            names.append(name)
    names += [n for n in DIFFUSERS if ":" in n]
    return sorted(n for n in names if n not in DIFFUSERS_LEFT_OUT)


#: The fixed sample (``tests/test_sweep.py`` and ``--sample``): case names as ``tools/sweep.py``
#: prints them.
SAMPLE: list[str] = [
    "llama nf4-dq", "llama int8 40KB", "llama nf4-dq bf16",
    "qwen2 int8", "mistral nf4-dq", "gemma int8",
    "mixtral nf4-dq", "mixtral int8 40KB", "qwen3_moe int8", "qwen3_moe nf4-dq bf16", "olmoe nf4-dq",
    "model:bert nf4-dq", "model:bert int8 40KB", "model:roberta int8",
    "model:t5 nf4-dq", "model:t5 int8 40KB", "model:bart int8", "t5-encoder nf4-dq",
    "gpt2 nf4-dq", "gpt2 int8",
    "mamba int8", "jamba int8", "falcon_h1 nf4-dq", "gemma3 nf4-dq", "codegen nf4-dq", "inkling2_text nf4-dq",
    "SD3Transformer2DModel nf4-dq", "SD3Transformer2DModel int8 40KB", "FluxTransformer2DModel nf4-dq",
    "FluxTransformer2DModel int8 bf16", "UNet2DModel int8", "UNet2DConditionModel nf4-dq",
    "UNet2DConditionModel:sdxl int8", "AutoencoderKL nf4-dq", "WanTransformer3DModel nf4-dq",
]


@dataclass(frozen=True)
class Randn:
    """A random normal input of this shape (in the case's dtype)."""

    shape: tuple[int, ...]


@dataclass(frozen=True)
class Ones:
    """An all-ones input (attention masks)."""

    shape: tuple[int, ...]
    dtype: str = "float32"


@dataclass(frozen=True)
class Zeros:
    """An all-zeros float32 input (position ids)."""

    shape: tuple[int, ...]


@dataclass(frozen=True)
class Tensor:
    """A fixed tensor (timesteps, labels, sizes)."""

    values: list[Any]
    dtype: str = "float32"


T1 = Tensor([1.0])
TEXT = Randn((1, 5, 32))
MASK = Ones((1, 5))

#: Forward inputs of the load comparison, per diffusers class (shapes follow its tiny init
#: arguments). A class without an entry gets ``n/a`` in the load column (its loaded tensors are
#: still compared with the reference's).
DIFFUSERS_INPUTS: dict[str, dict[str, Any]] = {
    "SD3Transformer2DModel": dict(
        hidden_states=Randn((1, 4, 8, 8)), encoder_hidden_states=TEXT, pooled_projections=Randn((1, 16)), timestep=T1
    ),
    "FluxTransformer2DModel": dict(
        hidden_states=Randn((1, 16, 64)), encoder_hidden_states=TEXT, pooled_projections=Randn((1, 32)), timestep=T1,
        img_ids=Zeros((16, 3)), txt_ids=Zeros((5, 3)),
    ),
    "ChromaTransformer2DModel": dict(
        hidden_states=Randn((1, 16, 64)), encoder_hidden_states=TEXT, timestep=T1, img_ids=Zeros((16, 3)),
        txt_ids=Zeros((5, 3)),
    ),
    "Flux2Transformer2DModel": dict(
        hidden_states=Randn((1, 16, 128)), encoder_hidden_states=TEXT, timestep=T1, img_ids=Zeros((16, 4)),
        txt_ids=Zeros((5, 4)), guidance=T1,
    ),
    "UNet2DModel": dict(sample=Randn((1, 3, 8, 8)), timestep=T1),
    "UNet2DConditionModel": dict(sample=Randn((1, 4, 8, 8)), timestep=T1, encoder_hidden_states=TEXT),
    "UNet2DConditionModel:sdxl": dict(
        sample=Randn((1, 4, 8, 8)), timestep=T1, encoder_hidden_states=TEXT,
        added_cond_kwargs={"text_embeds": Randn((1, 32)), "time_ids": Tensor([[8.0, 8.0, 0.0, 0.0, 8.0, 8.0]])},
    ),
    "AutoencoderKL": dict(sample=Randn((1, 3, 16, 16))),
    "WanTransformer3DModel": dict(hidden_states=Randn((1, 16, 1, 4, 4)), timestep=T1, encoder_hidden_states=TEXT),
    "LTXVideoTransformer3DModel": dict(
        hidden_states=Randn((1, 4, 128)), encoder_hidden_states=TEXT, timestep=T1, encoder_attention_mask=MASK,
        num_frames=1, height=2, width=2,
    ),
    "PixArtTransformer2DModel": dict(
        hidden_states=Randn((1, 4, 8, 8)), encoder_hidden_states=TEXT, timestep=T1,
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    ),
    "SanaTransformer2DModel": dict(hidden_states=Randn((1, 32, 8, 8)), encoder_hidden_states=TEXT, timestep=T1),
    "CogVideoXTransformer3DModel": dict(hidden_states=Randn((1, 1, 16, 8, 8)), encoder_hidden_states=TEXT, timestep=T1),
    "HunyuanVideoTransformer3DModel": dict(
        hidden_states=Randn((1, 16, 1, 8, 8)), timestep=T1, encoder_hidden_states=TEXT, encoder_attention_mask=MASK,
        pooled_projections=Randn((1, 32)), guidance=T1,
    ),
    "MochiTransformer3DModel": dict(
        hidden_states=Randn((1, 12, 1, 8, 8)), encoder_hidden_states=TEXT, timestep=T1, encoder_attention_mask=MASK
    ),
    "Lumina2Transformer2DModel": dict(
        hidden_states=Randn((1, 16, 8, 8)), timestep=T1, encoder_hidden_states=TEXT,
        encoder_attention_mask=Ones((1, 5), "bool"),
    ),
    "QwenImageTransformer2DModel": dict(
        hidden_states=Randn((1, 16, 64)), encoder_hidden_states=TEXT, encoder_hidden_states_mask=MASK, timestep=T1,
        img_shapes=[(1, 4, 4)],
    ),
    "AuraFlowTransformer2DModel": dict(hidden_states=Randn((1, 4, 8, 8)), encoder_hidden_states=TEXT, timestep=T1),
    "DiTTransformer2DModel": dict(
        hidden_states=Randn((1, 4, 32, 32)), timestep=Tensor([1], "long"), class_labels=Tensor([1], "long")
    ),
    "CogView4Transformer2DModel": dict(
        hidden_states=Randn((1, 16, 8, 8)), encoder_hidden_states=TEXT, timestep=T1,
        original_size=Tensor([[8.0, 8.0]]), target_size=Tensor([[8.0, 8.0]]), crop_coords=Tensor([[0.0, 0.0]]),
    ),
}


def build_diffusers(name: str) -> Any:
    diffusers: Any = importlib.import_module("diffusers")

    return getattr(diffusers, name.split(":")[0])(**diffusers_kwargs(name))


def diffusers_inputs(name: str, dtype: Any) -> dict[str, Any] | None:
    """The forward inputs of DIFFUSERS_INPUTS[name], random ones in ``dtype`` (fixed seed); None
    for a class without an entry."""
    spec = DIFFUSERS_INPUTS.get(name)
    if spec is None:
        return None
    import torch

    g = torch.Generator().manual_seed(3)

    def make(value: Any) -> Any:
        if isinstance(value, Randn):
            return torch.randn(*value.shape, generator=g).to(dtype)
        if isinstance(value, Ones):
            return torch.ones(*value.shape, dtype=getattr(torch, value.dtype))
        if isinstance(value, Zeros):
            return torch.zeros(*value.shape)
        if isinstance(value, Tensor):
            return torch.tensor(value.values, dtype=getattr(torch, value.dtype))
        if isinstance(value, dict):
            return {k: make(v) for k, v in value.items()}
        return value

    return {k: make(v) for k, v in spec.items()}
