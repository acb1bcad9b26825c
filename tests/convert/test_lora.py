"""``convert(lora=...)`` against the references: peft's ``merge_and_unload`` (transformers) and
diffusers' ``load_lora_adapter``/``load_lora_weights`` + ``fuse_lora`` (diffusers), each followed
by quantize-on-load + ``save_pretrained`` of the merged model; tiny models and adapters built here."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import pytest
import safetensors.torch
import torch
import transformers

import quantsave as qs
from conftest import files_equal, quantized_on_load, tiny_llama_config
from quantsave.errors import CheckpointError

peft = pytest.importorskip("peft")

NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)


@pytest.fixture(scope="module")
def llama_bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama-bf16")
    transformers.LlamaForCausalLM(tiny_llama_config()).to(torch.bfloat16).save_pretrained(path)
    return path


def _adapter(base: Path, path: Path, **config: object) -> Path:
    torch.manual_seed(1)
    model = peft.get_peft_model(
        transformers.AutoModelForCausalLM.from_pretrained(base), peft.LoraConfig(init_lora_weights=False, **config)
    )
    if config.get("use_dora"):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "magnitude" in name:
                    p.mul_(1.1)
    model.save_pretrained(path)
    return path


def _reference_transformers(base: Path, adapters: list[tuple[Path, float]], tmp: Path, qc: dict) -> Path:
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    for adapter, scale in adapters:
        model = peft.PeftModel.from_pretrained(model, adapter)
        if scale != 1.0:
            for module in model.modules():
                if isinstance(module, peft.tuners.lora.LoraLayer):
                    module.set_scale("default", scale)
        model = model.merge_and_unload()
    model.save_pretrained(tmp / "merged")
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        tmp / "merged", quantization_config=transformers.BitsAndBytesConfig(**qc), device_map="cpu"
    )
    ref.save_pretrained(tmp / "hf")
    return tmp / "hf"


@pytest.mark.parametrize(
    ("qc", "config"),
    [
        (NF4, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                   rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 3})),
        (dict(load_in_8bit=True), dict(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"])),
        (NF4, dict(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj"], use_dora=True, use_rslora=True)),
    ],
    ids=["nf4-patterns", "int8", "nf4-dora-rslora"],
)  # fmt: skip
def test_peft_adapter_equals_merge_and_unload(llama_bf16, tmp_path, llama_ids, qc, config) -> None:  # type: ignore[no-untyped-def]
    adapter = _adapter(llama_bf16, tmp_path / "adapter", **config)
    ref = _reference_transformers(llama_bf16, [(adapter, 1.0)], tmp_path, qc)
    qs.convert(llama_bf16, tmp_path / "qs", qs.BitsAndBytesConfig(**qc), lora=adapter)
    assert files_equal(tmp_path / "qs", ref) == []
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qs")
    with torch.no_grad():
        assert torch.isfinite(loaded(llama_ids).logits).all()


def test_two_adapters_in_order_with_scales(llama_bf16, tmp_path) -> None:  # type: ignore[no-untyped-def]
    a = _adapter(llama_bf16, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    b = _adapter(llama_bf16, tmp_path / "b", r=2, lora_alpha=2, target_modules=["q_proj", "up_proj"])
    ref = _reference_transformers(llama_bf16, [(a, 0.5), (b, 1.5)], tmp_path, NF4)
    # The weights file of an adapter works as well as its folder.
    qs.convert(llama_bf16, tmp_path / "qs", NF4 | {"quant_method": "bitsandbytes"},
               lora=[(a, 0.5), (b / "adapter_model.safetensors", 1.5)])  # fmt: skip
    assert files_equal(tmp_path / "qs", ref) == []


def test_scale_zero_is_the_plain_conversion(llama_bf16, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The Python path (made tensors) writes the same bytes as the Rust converter."""
    a = _adapter(llama_bf16, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    for name, qc in (("nf4", NF4), ("int8", dict(load_in_8bit=True))):
        config = qs.BitsAndBytesConfig(**qc)
        qs.convert(llama_bf16, tmp_path / f"plain-{name}", config)
        qs.convert(llama_bf16, tmp_path / f"zero-{name}", config, lora=[(a, 0.0)])
        assert files_equal(tmp_path / f"zero-{name}", tmp_path / f"plain-{name}") == []


@pytest.mark.parametrize("qc", [NF4, dict(load_in_8bit=True)], ids=["nf4-dq", "int8"])
def test_quantized_merge_equals_peft_merge_of_the_quantized_model(llama_bf16, tmp_path, llama_ids, qc) -> None:  # type: ignore[no-untyped-def]
    """``lora_merge="quantized"`` against peft's merge into a bitsandbytes model
    (``PeftModel.from_pretrained(quantized, adapter).merge_and_unload()``: each layer
    dequantized, the delta added, quantized again), compared layer by layer in memory since
    transformers cannot save that merged model."""
    bnb = pytest.importorskip("bitsandbytes")
    a = _adapter(llama_bf16, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    b = _adapter(llama_bf16, tmp_path / "b", r=2, lora_alpha=4, target_modules=["q_proj"])
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        llama_bf16, quantization_config=transformers.BitsAndBytesConfig(**qc), device_map="cpu"
    )
    for adapter in (a, b):
        quantized = peft.PeftModel.from_pretrained(quantized, adapter).merge_and_unload()
    qs.convert(llama_bf16, tmp_path / "qs", qs.BitsAndBytesConfig(**qc), lora=[a, b], lora_merge="quantized")
    ours = qs.load_quantized(tmp_path / "qs")
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.0.self_attn.k_proj"):
        theirs, mine = quantized.get_submodule(name).weight, ours.get_submodule(name).weight
        if qc is NF4:
            assert torch.equal(theirs.data.view(torch.uint8), mine.data.view(torch.uint8)), name
            t, m = theirs.quant_state, mine.quant_state
            assert t.dtype == m.dtype and torch.equal(t.absmax, m.absmax)
            assert torch.equal(t.state2.absmax, m.state2.absmax)
            assert bnb.functional.dequantize_4bit(theirs.data, t).equal(bnb.functional.dequantize_4bit(mine.data, m))
        else:
            assert torch.equal(theirs.data, mine.data) and torch.equal(theirs.SCB, mine.SCB), name
    # peft's 4-bit merge quantizes the float32 sum (its adapters are float32): the state says so.
    if qc is NF4:
        assert ours.get_submodule("model.layers.0.self_attn.q_proj").weight.quant_state.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(ours(llama_ids).logits, quantized(llama_ids).logits)
    # The float merge differs from it.
    qs.convert(llama_bf16, tmp_path / "float", qs.BitsAndBytesConfig(**qc), lora=[a, b])
    assert files_equal(tmp_path / "float", tmp_path / "qs") == ["model.safetensors"]


def test_quantized_merge_keeps_float_weights_float(llama_bf16, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A weight the conversion keeps in float (a skipped module) merges in float either way."""
    from safetensors.torch import load_file

    a = _adapter(llama_bf16, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    config = qs.BitsAndBytesConfig(**NF4, llm_int8_skip_modules=["down_proj", "lm_head"])
    qs.convert(llama_bf16, tmp_path / "q", config, lora=a, lora_merge="quantized")
    qs.convert(llama_bf16, tmp_path / "f", config, lora=a)
    q, f = load_file(tmp_path / "q" / "model.safetensors"), load_file(tmp_path / "f" / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.weight"
    assert q[key].dtype == torch.bfloat16 and torch.equal(q[key], f[key])
    assert not torch.equal(q["model.layers.0.self_attn.q_proj.weight"], f["model.layers.0.self_attn.q_proj.weight"])


def test_sd3_diffusers_lora_equals_fuse_lora(sd3_dir, diffusers_bnb_on_cpu, tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(2)
    model = diffusers.SD3Transformer2DModel.from_pretrained(sd3_dir)
    model.add_adapter(
        peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"],
                        init_lora_weights=False)
    )  # fmt: skip
    diffusers.StableDiffusion3Pipeline.save_lora_weights(
        tmp_path / "lora", transformer_lora_layers=peft.utils.get_peft_model_state_dict(model)
    )
    lora = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    for dtype in (torch.float32, torch.bfloat16):
        ref = diffusers.SD3Transformer2DModel.from_pretrained(sd3_dir, torch_dtype=dtype)
        ref.load_lora_adapter(lora, prefix="transformer")
        ref.fuse_lora(lora_scale=0.7)
        ref.unload_lora()
        qc = diffusers.BitsAndBytesConfig(**NF4)
        quantized_on_load(ref, tmp_path, qc, dtype)
        qs.convert(sd3_dir, tmp_path / "qs", qc, torch_dtype=dtype, lora=[(lora, 0.7)])
        # config.json differs only in the folder diffusers records (the merged copy's, ours the source's).
        assert files_equal(tmp_path / "qs", tmp_path / "hf") == ["config.json"]
        ours = json.loads((tmp_path / "qs" / "config.json").read_text())
        theirs = json.loads((tmp_path / "hf" / "config.json").read_text())
        assert ours.pop("_name_or_path") == str(sd3_dir)
        theirs.pop("_name_or_path")
        assert ours == theirs


TINY_SD_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)


#: Target modules, under their diffusers names and their SGM (original SDXL) kohya names.
KOHYA_TARGETS = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks_1_1_transformer_blocks_0_attn1_to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": "input_blocks_1_1_transformer_blocks_0_attn2_to_k",
    "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2": "output_blocks_3_1_transformer_blocks_0_ff_net_2",
    "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0":
        "output_blocks_3_1_transformer_blocks_0_attn1_to_out_0",
}  # fmt: skip


@pytest.mark.parametrize("names", ["diffusers", "sgm"])
def test_kohya_unet_lora_equals_load_lora_weights(diffusers_bnb_on_cpu, tmp_path, names) -> None:  # type: ignore[no-untyped-def]
    """kohya files with diffusers block names (as SD1.5's load_lora_weights reads them) and
    with SGM names (as SDXL's reads them, mapping the blocks through the UNet's config)."""
    torch.manual_seed(3)
    unet = diffusers.UNet2DConditionModel(**TINY_SD_UNET)
    unet.save_pretrained(tmp_path / "unet")
    modules = dict(unet.named_modules())
    kohya: dict[str, torch.Tensor] = {}
    for i, (name, sgm) in enumerate(KOHYA_TARGETS.items()):
        layer = modules[name]
        rank = 4 if i % 2 == 0 else 2
        base = "lora_unet_" + (name.replace(".", "_") if names == "diffusers" else sgm)
        kohya[f"{base}.lora_down.weight"] = torch.randn(rank, layer.in_features) * 0.1
        kohya[f"{base}.lora_up.weight"] = torch.randn(layer.out_features, rank) * 0.1
        kohya[f"{base}.alpha"] = torch.tensor(float(rank + 1))
    safetensors.torch.save_file(kohya, tmp_path / "kohya.safetensors")

    ref = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    if names == "diffusers":
        loader = diffusers.StableDiffusionPipeline
        state_dict, alphas = loader.lora_state_dict(str(tmp_path / "kohya.safetensors"))
    else:
        loader = diffusers.StableDiffusionXLPipeline
        state_dict, alphas = loader.lora_state_dict(str(tmp_path / "kohya.safetensors"), unet_config=ref.config)
    assert any("down_blocks.0.attentions.0" in k for k in state_dict)
    loader.load_lora_into_unet(state_dict, alphas, unet=ref)
    ref.fuse_lora(lora_scale=0.8)
    ref.unload_lora()
    qc = diffusers.BitsAndBytesConfig(**NF4)
    quantized_on_load(ref, tmp_path, qc, torch.float32)
    qs.convert(tmp_path / "unet", tmp_path / "qs", qc, torch_dtype=torch.float32,
               lora=[(tmp_path / "kohya.safetensors", 0.8)])  # fmt: skip
    assert files_equal(tmp_path / "qs", tmp_path / "hf") == ["config.json"]


def test_bad_adapters_are_refused_before_anything_is_written(llama_bf16, tmp_path) -> None:  # type: ignore[no-untyped-def]
    adapter = _adapter(llama_bf16, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"])
    weights = safetensors.torch.load_file(adapter / "adapter_model.safetensors")
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("previous")
    config = qs.BitsAndBytesConfig(**NF4)

    def variant(name: str, change: dict[str, torch.Tensor]) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
        safetensors.torch.save_file({**weights, **change}, path / "adapter_model.safetensors")
        return path

    key = "base_model.model.model.layers.0.self_attn.q_proj"
    unknown = variant("unknown", {
        "base_model.model.model.layers.0.self_attn.nope.lora_A.weight": weights[f"{key}.lora_A.weight"].clone(),
        "base_model.model.model.layers.0.self_attn.nope.lora_B.weight": weights[f"{key}.lora_B.weight"].clone(),
    })  # fmt: skip
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.nope', which the model has no weight"):
        qs.convert(llama_bf16, dst, config, lora=unknown)
    rank = variant("rank", {f"{key}.lora_A.weight": torch.randn(3, 64), f"{key}.lora_B.weight": torch.randn(64, 3)})
    with pytest.raises(CheckpointError, match="not rank 4"):
        qs.convert(llama_bf16, dst, config, lora=rank)
    shape = variant("shape", {f"{key}.lora_A.weight": torch.randn(4, 32)})
    with pytest.raises(CheckpointError, match="maps 32 -> 64 features"):
        qs.convert(llama_bf16, dst, config, lora=shape)
    with pytest.raises(FileNotFoundError):
        qs.convert(llama_bf16, dst, config, lora=tmp_path / "missing")
    with pytest.raises(ValueError, match="lora_merge"):
        qs.convert(llama_bf16, dst, config, lora=adapter, lora_merge="sideways")
    assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"]


def test_pipeline_lora_goes_to_its_components(sd3_dir, diffusers_bnb_on_cpu, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A pipeline folder with a LoRA holding ``transformer.`` and ``text_encoder.`` parts: each
    converted component gets its part, as ``load_lora_weights`` + ``fuse_lora`` give them."""
    from diffusers.loaders.lora_base import _remove_text_encoder_monkey_patch, fuse_text_encoder_lora

    pipe = tmp_path / "pipe"
    torch.manual_seed(7)
    te_config = transformers.CLIPTextConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, projection_dim=32,
    )  # fmt: skip
    transformers.CLIPTextModelWithProjection(te_config).save_pretrained(pipe / "text_encoder")
    diffusers.SD3Transformer2DModel.from_pretrained(sd3_dir).save_pretrained(pipe / "transformer")
    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": diffusers.__version__,
             "transformer": ["diffusers", "SD3Transformer2DModel"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
             "text_encoder_2": [None, None], "text_encoder_3": [None, None], "tokenizer": [None, None],
             "tokenizer_2": [None, None], "tokenizer_3": [None, None], "vae": [None, None],
             "scheduler": [None, None]}  # fmt: skip
    (pipe / "model_index.json").write_text(json.dumps(index))
    transformer = diffusers.SD3Transformer2DModel.from_pretrained(pipe / "transformer")
    t_lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v"], init_lora_weights=False)
    transformer.add_adapter(t_lora)
    te = transformers.CLIPTextModelWithProjection.from_pretrained(pipe / "text_encoder")
    # (transformers 5.24's own adapter methods need peft >= 0.22, not released: peft directly.)
    te_lora = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "fc1"], init_lora_weights=False)
    peft.inject_adapter_in_model(te_lora, te)
    diffusers.StableDiffusion3Pipeline.save_lora_weights(
        tmp_path / "lora", transformer_lora_layers=peft.utils.get_peft_model_state_dict(transformer),
        text_encoder_lora_layers=peft.utils.get_peft_model_state_dict(te),
    )  # fmt: skip
    lora = tmp_path / "lora" / "pytorch_lora_weights.safetensors"

    # The reference, component by component, as StableDiffusion3Pipeline.load_lora_weights routes it.
    mixin = diffusers.StableDiffusion3Pipeline
    state_dict, metadata = mixin.lora_state_dict(str(lora), return_lora_metadata=True)
    ref_t = diffusers.SD3Transformer2DModel.from_pretrained(pipe / "transformer", torch_dtype=torch.float32)
    mixin.load_lora_into_transformer(state_dict, transformer=ref_t, metadata=metadata)
    ref_t.fuse_lora(lora_scale=0.6)
    ref_t.unload_lora()
    ref_t.save_pretrained(tmp_path / "merged" / "transformer")
    ref_te = transformers.CLIPTextModelWithProjection.from_pretrained(pipe / "text_encoder")
    _load_lora_into_text_encoder(mixin, state_dict, ref_te)
    fuse_text_encoder_lora(ref_te, lora_scale=0.6)
    _remove_text_encoder_monkey_patch(ref_te)
    ref_te.save_pretrained(tmp_path / "merged" / "text_encoder")
    diffusers.SD3Transformer2DModel.from_pretrained(
        tmp_path / "merged" / "transformer", quantization_config=diffusers.BitsAndBytesConfig(**NF4),
        torch_dtype=torch.float32, device_map="cpu",
    ).save_pretrained(tmp_path / "hf" / "transformer")  # fmt: skip
    transformers.CLIPTextModelWithProjection.from_pretrained(
        tmp_path / "merged" / "text_encoder", quantization_config=transformers.BitsAndBytesConfig(**NF4),
        device_map="cpu",
    ).save_pretrained(tmp_path / "hf" / "text_encoder")  # fmt: skip

    qs.convert(pipe, tmp_path / "qs", qs.BitsAndBytesConfig(**NF4), torch_dtype=torch.float32, lora=[(lora, 0.6)])
    assert files_equal(tmp_path / "qs" / "transformer", tmp_path / "hf" / "transformer") == ["config.json"]
    assert files_equal(tmp_path / "qs" / "text_encoder", tmp_path / "hf" / "text_encoder") == []
    qs.convert(pipe, tmp_path / "plain", qs.BitsAndBytesConfig(**NF4), torch_dtype=torch.float32)
    for component in ("transformer", "text_encoder"):  # both merged indeed
        assert files_equal(tmp_path / "qs" / component, tmp_path / "plain" / component) != []
    # A LoRA part for a component the conversion copies is an error (the copy would not have
    # it); so is a LoRA with nothing for the converted components; nothing is written.
    with pytest.raises(ValueError, match="has weights for 'transformer', which this conversion copies"):
        qs.convert(pipe, tmp_path / "none", qs.BitsAndBytesConfig(**NF4), components=["text_encoder"], lora=lora)
    other = {k.replace("text_encoder.", "text_encoder_2.", 1): v
             for k, v in safetensors.torch.load_file(lora).items() if k.startswith("text_encoder.")}  # fmt: skip
    safetensors.torch.save_file(other, tmp_path / "te2.safetensors")
    with pytest.raises(ValueError, match="no LoRA weights for the converted components"):
        qs.convert(pipe, tmp_path / "none", qs.BitsAndBytesConfig(**NF4), lora=tmp_path / "te2.safetensors")
    assert not (tmp_path / "none").exists()


def _load_lora_into_text_encoder(mixin, state_dict, text_encoder) -> None:  # type: ignore[no-untyped-def]
    """diffusers' ``load_lora_into_text_encoder``, whose last step (transformers'
    ``load_adapter``) needs peft >= 0.22 with transformers 5.24: the same steps, with that one
    done by peft itself (inject the config's layers, load the weights), then diffusers' scaling
    and the cast to the model's dtype."""
    from diffusers.utils.peft_utils import _create_lora_config
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

    sd = {k.removeprefix("text_encoder."): v for k, v in state_dict.items() if k.startswith("text_encoder.")}
    sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(sd))
    rank = {f"{n}.lora_B.weight": sd[f"{n}.lora_B.weight"].shape[1] for n, _ in text_encoder.named_modules()
            if n.endswith((".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2"))
            and f"{n}.lora_B.weight" in sd}  # fmt: skip
    config = _create_lora_config(sd, None, None, rank, is_unet=False)
    peft.inject_adapter_in_model(config, text_encoder, adapter_name="default_0")
    peft.set_peft_model_state_dict(text_encoder, sd, adapter_name="default_0")
    text_encoder.to(dtype=text_encoder.dtype)
