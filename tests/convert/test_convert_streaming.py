"""``convert``'s streaming path: pipeline folders (named components converted, the rest copied),
chunking that never changes a byte, failures that keep the previous checkpoint, the progress
bar, and the static layout that spares importing transformers' modeling code."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import quantsave as qs
from conftest import TINY_UNET, files_equal

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

convert_source = importlib.import_module("quantsave.convert.source")
convert_write = importlib.import_module("quantsave.convert.write")

NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4")


class TinyPipeline(diffusers.DiffusionPipeline):  # type: ignore[misc,name-defined]
    def __init__(self, unet, text_encoder, scheduler) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, scheduler=scheduler)


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**TINY_UNET)
    config = transformers.CLIPTextConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
    )
    path = tmp_path_factory.mktemp("pipe-float")
    TinyPipeline(
        unet.eval(), transformers.CLIPTextModel(config).eval(), diffusers.DDPMScheduler()
    ).save_pretrained(path)
    return path


X = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
IDS = torch.tensor([[0, 5, 9, 33, 1]])


def outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return pipe.unet(X, 10).sample, pipe.text_encoder(IDS).last_hidden_state


def test_pipeline_folder_converts_named_components(pipe_dir, diffusers_bnb_on_cpu, tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = qs.convert(pipe_dir, tmp_path / "qs", qs.BitsAndBytesConfig(**NF4), torch_dtype=torch.float32)
    assert result.num_shards == 2  # unet and text_encoder, the components with weights
    ref = TinyPipeline.from_pretrained(
        pipe_dir,
        quantization_config=diffusers.PipelineQuantizationConfig(
            quant_backend="bitsandbytes_4bit", quant_kwargs=NF4, components_to_quantize=["unet", "text_encoder"]
        ),
        device_map="cpu",
        torch_dtype=torch.float32,  # both default to float16, diffusers' bitsandbytes choice
    )
    ref.save_pretrained(tmp_path / "hf")
    for component in ("unet", "text_encoder"):
        assert files_equal(tmp_path / "qs" / component, tmp_path / "hf" / component) == [], component
    # Everything else is copied as it is.
    assert files_equal(tmp_path / "qs" / "scheduler", pipe_dir / "scheduler") == []
    assert (tmp_path / "qs" / "model_index.json").read_bytes() == (pipe_dir / "model_index.json").read_bytes()
    loaded = TinyPipeline.from_pretrained(tmp_path / "qs", device_map="cpu", torch_dtype=torch.float32)
    for a, b in zip(outputs(loaded), outputs(ref), strict=True):
        assert torch.equal(a, b)


def _tree_equal(a: Path, b: Path) -> list[str]:
    """Files under ``b`` (recursively) whose bytes differ from, or are missing in, ``a``."""
    differ = []
    for f in sorted(p for p in b.rglob("*") if p.is_file()):
        mine = a / f.relative_to(b)
        if not mine.is_file() or mine.read_bytes() != f.read_bytes():
            differ.append(str(f.relative_to(b)))
    return differ


def test_pipeline_convert_takes_the_mappings_save_quantized_takes(pipe_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``convert(pipeline_dir, dst, {component: config})`` and a ``PipelineQuantizationConfig`` (both
    forms, the global one resolved by diffusers' own rule) mean what ``components=`` means."""
    int8 = diffusers.BitsAndBytesConfig(load_in_8bit=True)
    qs.convert(pipe_dir, tmp_path / "components", None, components={"unet": int8})
    granular = {"mapping": {"unet": int8}, "pqc": diffusers.PipelineQuantizationConfig(quant_mapping={"unet": int8})}
    for label, config in granular.items():
        qs.convert(pipe_dir, tmp_path / label, config)
        assert _tree_equal(tmp_path / label, tmp_path / "components") == [], label
    qs.convert(pipe_dir, tmp_path / "shared", qs.BitsAndBytesConfig(**NF4), components=["unet", "text_encoder"])
    pqc = diffusers.PipelineQuantizationConfig(
        quant_backend="bitsandbytes_4bit", quant_kwargs=NF4, components_to_quantize=["unet", "text_encoder"]
    )
    qs.convert(pipe_dir, tmp_path / "global", pqc)
    assert _tree_equal(tmp_path / "global", tmp_path / "shared") == []
    with pytest.raises(ValueError, match="not both"):
        qs.convert(pipe_dir, tmp_path / "both", {"unet": int8}, components=["unet"])


def test_pipeline_component_mapping(pipe_dir, diffusers_bnb_on_cpu, tmp_path) -> None:  # type: ignore[no-untyped-def]
    unet = {"unet": diffusers.BitsAndBytesConfig(load_in_8bit=True)}
    qs.convert(pipe_dir, tmp_path / "qs", None, components=unet, torch_dtype=torch.float32)
    assert json.loads((tmp_path / "qs" / "unet" / "config.json").read_text())["quantization_config"]["load_in_8bit"]
    assert files_equal(tmp_path / "qs" / "text_encoder", pipe_dir / "text_encoder") == []
    ref = diffusers.UNet2DModel.from_pretrained(
        pipe_dir / "unet", quantization_config=diffusers.BitsAndBytesConfig(load_in_8bit=True), device_map="cpu",
        torch_dtype=torch.float32,
    )
    ref.save_pretrained(tmp_path / "hf")
    assert files_equal(tmp_path / "qs" / "unet", tmp_path / "hf") == []


def test_pipeline_bad_components_write_nothing(pipe_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="scheduler"):
        qs.convert(pipe_dir, tmp_path / "a", qs.BitsAndBytesConfig(**NF4), components=["scheduler"])
    with pytest.raises(ValueError, match="vae"):
        qs.convert(pipe_dir, tmp_path / "b", None, components={"vae": qs.BitsAndBytesConfig(**NF4)})
    with pytest.raises(ValueError, match="pipeline"):
        qs.convert(pipe_dir / "unet", tmp_path / "c", qs.BitsAndBytesConfig(**NF4), components=["unet"])
    assert not any((tmp_path / n).exists() for n in "abc")


@pytest.mark.parametrize(
    "config",
    [NF4, dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True), dict(load_in_8bit=True)],
    ids=["nf4", "fp4-dq", "int8"],
)
def test_chunk_size_never_changes_a_byte(config, llama_dir, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    qs.convert(llama_dir, tmp_path / "whole", qs.BitsAndBytesConfig(**config), max_shard_size="60KB")
    monkeypatch.setattr(convert_write, "CHUNK_ELEMS", 1)  # one nested block (16 384 values) per chunk
    qs.convert(llama_dir, tmp_path / "chunked", qs.BitsAndBytesConfig(**config), max_shard_size="60KB")
    names = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert len(names) > 3 and names == sorted(p.name for p in (tmp_path / "chunked").iterdir())
    assert files_equal(tmp_path / "chunked", tmp_path / "whole") == []


def test_failure_keeps_the_previous_checkpoint(llama_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    nf4 = qs.BitsAndBytesConfig(**NF4)
    qs.convert(llama_dir, tmp_path / "out", nf4)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    bad = tmp_path / "bad"
    shutil.copytree(llama_dir, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(qs.CheckpointError):
        qs.convert(bad, tmp_path / "out", nf4)
    # A NaN in a weight: found while quantizing, after the output files were started.
    (bad / "model.safetensors").write_bytes(data)
    from safetensors.torch import load_file, save_file

    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][3, 4] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="NaN"):
        qs.convert(bad, tmp_path / "out", nf4)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_progress_bar(llama_dir, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    qs.convert(llama_dir, tmp_path / "out", qs.BitsAndBytesConfig(**NF4), progress=True)
    assert "Converting" in capsys.readouterr().err
    qs.convert(llama_dir, tmp_path / "quiet", qs.BitsAndBytesConfig(**NF4), progress=False)
    assert "Converting" not in capsys.readouterr().err


def test_static_layout_spares_the_transformers_import(llama_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A checkpoint written by the installed transformers converts without importing it, to the
    bytes the skeleton path (model passed in) writes; a config from another version takes the
    skeleton path."""
    code = (
        "import sys, quantsave as qs; "
        f"qs.convert({str(llama_dir)!r}, {str(tmp_path / 'static')!r}, qs.BitsAndBytesConfig(load_in_4bit=True)); "
        "print('transformers' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
    config = transformers.AutoConfig.from_pretrained(llama_dir)
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(config)
    qs.convert(llama_dir, tmp_path / "skeleton", qs.BitsAndBytesConfig(load_in_4bit=True), model=skeleton)
    assert files_equal(tmp_path / "static", tmp_path / "skeleton") == []

    older = tmp_path / "older"
    shutil.copytree(llama_dir, older)
    cfg = json.loads((older / "config.json").read_text())
    cfg["transformers_version"] = "4.0.0"
    (older / "config.json").write_text(json.dumps(cfg))
    layout = convert_source.static_targets(
        convert_source.read_source(older), qs.BitsAndBytesConfig(load_in_4bit=True), None
    )
    assert layout is None
    assert convert_source.static_targets(
        convert_source.read_source(llama_dir), qs.BitsAndBytesConfig(load_in_4bit=True), None
    )


@pytest.mark.parametrize("config", [NF4, dict(load_in_8bit=True)], ids=["nf4", "int8"])
def test_converted_folder_loads_with_quantsave(config, llama_dir, llama_ids, tmp_path) -> None:  # type: ignore[no-untyped-def]
    qs.convert(llama_dir, tmp_path / "out", qs.BitsAndBytesConfig(**config), max_shard_size="100KB")
    ours = qs.load_quantized(tmp_path / "out")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(ours(llama_ids).logits, ref(llama_ids).logits)


def test_static_path_with_biased_linears(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Qwen2's q/k/v projections have biases, listed before their weights in the file: the
    static path plans them like the model's order and matches transformers byte for byte."""
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    )
    transformers.Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "src")
    assert convert_source.static_targets(
        convert_source.read_source(tmp_path / "src"), qs.BitsAndBytesConfig(**NF4), None
    )
    for name, config in {"nf4": NF4, "int8": dict(load_in_8bit=True)}.items():
        qs.convert(tmp_path / "src", tmp_path / f"qs-{name}", qs.BitsAndBytesConfig(**config))
        ref = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "src", quantization_config=transformers.BitsAndBytesConfig(**config), device_map="cpu"
        )
        ref.save_pretrained(tmp_path / f"hf-{name}")
        assert files_equal(tmp_path / f"qs-{name}", tmp_path / f"hf-{name}") == [], name


def test_pipeline_dst_inside_src_is_refused(pipe_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="inside"):
        qs.convert(pipe_dir, pipe_dir / "out", qs.BitsAndBytesConfig(**NF4))
    assert not (pipe_dir / "out").exists()


def test_pipeline_reconversion_replaces_the_whole_folder(pipe_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Converting again with fewer components: the copied component is exactly the source's
    (no quantized leftovers), and the first conversion's files were never written through."""
    out = tmp_path / "out"
    qs.convert(pipe_dir, out, qs.BitsAndBytesConfig(load_in_8bit=True))
    first = (out / "text_encoder" / "model.safetensors").read_bytes()
    keep = tmp_path / "keep.safetensors"
    os.link(out / "text_encoder" / "model.safetensors", keep)  # a second name for the old file
    qs.convert(pipe_dir, out, None, components={"unet": qs.BitsAndBytesConfig(load_in_8bit=True)})
    assert files_equal(out / "text_encoder", pipe_dir / "text_encoder") == []
    assert sorted(p.name for p in (out / "text_encoder").iterdir()) == sorted(
        p.name for p in (pipe_dir / "text_encoder").iterdir()
    )
    assert keep.read_bytes() == first
    assert not [p.name for p in tmp_path.iterdir() if ".quantsave-" in p.name]
