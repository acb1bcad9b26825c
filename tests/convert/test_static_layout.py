"""static_layout: reading transformers' source gives ``bnb_targets``' answer on a meta skeleton, or None."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from quantsave import _core
from quantsave.backends.bitsandbytes.config import BitsAndBytesConfig
from quantsave.cli import main
from quantsave.convert.static_layout import _static_targets, _Unsure, transformers_bnb_targets
from quantsave.convert.static_layout import keys as static_keys
from quantsave.convert.static_layout.interpret import Interpreter
from quantsave.load import build_skeleton
from quantsave.quantize import bnb_targets

transformers = pytest.importorskip("transformers")

LLM = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
)


@dataclass(frozen=True)
class Case:
    id: str
    model_type: str
    arch: str
    kwargs: dict[str, Any]
    expect: str  # "answer": static must answer; "none": static must be unsure; "any": either


CASES = [
    Case("llama", "llama", "LlamaForCausalLM", {**LLM, "tie_word_embeddings": False}, "answer"),
    Case("llama-tied", "llama", "LlamaForCausalLM", {**LLM, "tie_word_embeddings": True}, "answer"),
    Case("llama-seqcls", "llama", "LlamaForSequenceClassification", {**LLM, "num_labels": 3}, "answer"),
    Case("llama-base", "llama", "LlamaModel", LLM, "answer"),
    Case("mistral", "mistral", "MistralForCausalLM", LLM, "answer"),
    Case("qwen2", "qwen2", "Qwen2ForCausalLM", LLM, "answer"),
    Case("qwen3", "qwen3", "Qwen3ForCausalLM", {**LLM, "head_dim": 8}, "answer"),
    Case("gemma", "gemma", "GemmaForCausalLM", {**LLM, "head_dim": 8}, "answer"),
    Case("gemma2", "gemma2", "Gemma2ForCausalLM", {**LLM, "head_dim": 8}, "answer"),
    Case("phi3", "phi3", "Phi3ForCausalLM", LLM, "answer"),
    Case("olmo", "olmo", "OlmoForCausalLM", LLM, "answer"),
    # Parameter-free LayerNorms: with lm_head tied (and left out of the checkpoint) the model's
    # last parameter is still lm_head.weight, so the last down_proj stays a target.
    Case("olmo-tied", "olmo", "OlmoForCausalLM", {**LLM, "tie_word_embeddings": True}, "answer"),
    Case("granite", "granite", "GraniteForCausalLM", LLM, "answer"),
    Case("stablelm", "stablelm", "StableLmForCausalLM", LLM, "answer"),
    Case("starcoder2", "starcoder2", "Starcoder2ForCausalLM", LLM, "answer"),
    # Saved as "embed_out.weight": transformers renames it to lm_head on load.
    Case("gpt_neox", "gpt_neox", "GPTNeoXForCausalLM", LLM, "answer"),
    Case(
        "opt",
        "opt",
        "OPTForCausalLM",
        dict(vocab_size=128, hidden_size=32, ffn_dim=64, word_embed_proj_dim=16, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=64, pad_token_id=0),
        "answer",
    ),
    Case(
        "falcon",
        "falcon",
        "FalconForCausalLM",
        dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
        "any",
    ),
    Case(
        "t5",
        "t5",
        "T5ForConditionalGeneration",
        dict(vocab_size=128, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4),
        "any",
    ),
    Case(
        "bert",
        "bert",
        "BertForMaskedLM",
        dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64),
        "any",
    ),
    Case(
        "bart",
        "bart",
        "BartForConditionalGeneration",
        dict(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64),
        "any",
    ),
    # transformers fuses the experts into one parameter on load (conversion_mapping.py).
    Case("mixtral", "mixtral", "MixtralForCausalLM", {**LLM, "num_local_experts": 4}, "none"),
    # GPT-2 style Conv1D (quantized transposed): the static reading leaves it to the skeleton.
    Case(
        "gpt2", "gpt2", "GPT2LMHeadModel", dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64), "none"
    ),
]


@dataclass
class Checkpoint:
    case: Case
    folder: Path
    config: dict[str, Any]
    tensors: dict[str, tuple[str, list[int]]]
    skeleton: torch.nn.Module


def _tensors(folder: Path) -> dict[str, tuple[str, list[int]]]:
    header = _core.read_header(str(folder / "model.safetensors"))
    return {name: (dtype, list(shape)) for name, dtype, shape, *_ in header["tensors"]}


def _save(case: Case, folder: Path) -> None:
    config = transformers.AutoConfig.for_model(case.model_type, **case.kwargs)
    torch.manual_seed(0)
    getattr(transformers, case.arch)(config).to(torch.bfloat16).save_pretrained(folder)


@pytest.fixture(scope="module", params=CASES, ids=[c.id for c in CASES])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    case: Case = request.param
    folder = tmp_path_factory.mktemp(case.id)
    _save(case, folder)
    config = json.loads((folder / "config.json").read_text())
    return Checkpoint(case, folder, config, _tensors(folder), build_skeleton(folder, config))


def _exact(skeleton: torch.nn.Module, tensors: dict[str, Any], skip: list[str] | None) -> list[str] | None:
    """The answer from the model itself; None where bnb_targets refuses the model."""
    try:
        names = bnb_targets(skeleton, BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=skip))
    except ValueError:
        return None
    return sorted(n for n in names if f"{n}.weight" in tensors)


def _why(config: dict[str, Any], tensors: dict[str, Any], skip: list[str] | None) -> str:
    try:
        _static_targets(config, tensors, skip)
    except _Unsure as e:
        return f"unsure: {e}"
    except Exception as e:  # noqa: BLE001 - shown in the failure message
        return f"{type(e).__name__}: {e}"
    return "answered"


@pytest.mark.parametrize(
    "skip", [None, ["mlp"], ["q_proj"], []], ids=["default-skips", "skip-mlp", "skip-q_proj", "no-skips"]
)
def test_static_targets_equal_bnb_targets(checkpoint: Checkpoint, skip: list[str] | None) -> None:
    ck = checkpoint
    exact = _exact(ck.skeleton, ck.tensors, skip)
    static = transformers_bnb_targets(ck.config, ck.tensors, skip)
    if ck.case.expect == "answer":
        assert static is not None, _why(ck.config, ck.tensors, skip)
    if ck.case.expect == "none" or exact is None:
        assert static is None
    if static is not None:
        assert static == exact


def test_llama_answer_skips_lm_head_and_quantizes_layers(llama_dir: Path) -> None:
    config = json.loads((llama_dir / "config.json").read_text())
    static = transformers_bnb_targets(config, _tensors(llama_dir), None)
    assert static is not None
    assert "lm_head" not in static
    assert len(static) == 2 * 7 and "model.layers.1.mlp.down_proj" in static
    assert "lm_head" in (transformers_bnb_targets(config, _tensors(llama_dir), []) or [])


def test_missing_tie_word_embeddings_takes_the_config_class_default(tmp_path: Path) -> None:
    case = Case("gemma-default-tie", "gemma", "GemmaForCausalLM", {**LLM, "head_dim": 8}, "answer")
    _save(case, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config.pop("tie_word_embeddings") is True  # GemmaConfig's default
    tensors = _tensors(tmp_path)
    static = transformers_bnb_targets(config, tensors, None)
    assert static is not None, _why(config, tensors, None)
    assert static == _exact(build_skeleton(tmp_path, config), tensors, None)


def _llama(llama_dir: Path) -> tuple[dict[str, Any], dict[str, tuple[str, list[int]]]]:
    return json.loads((llama_dir / "config.json").read_text()), _tensors(llama_dir)


@pytest.mark.parametrize(
    "change",
    [
        lambda c, t: c.update(auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"}),
        lambda c, t: c.update(model_type="no_such_model"),
        lambda c, t: c.update(architectures=["LlamaForMagic"]),
        lambda c, t: c.update(architectures=["LlamaForCausalLM", "LlamaModel"]),
        lambda c, t: c.pop("architectures"),
        lambda c, t: t.update({"model.layers.0.self_attn.extra_proj.weight": ("F32", [64, 64])}),
        lambda c, t: t.update({"model.norm.bias": ("F32", [64])}),
        lambda c, t: t.update({"model.layers.0.LayerNorm.gamma": ("F32", [64])}),
        lambda c, t: t.update({"model.layers.0.self_attn.q_proj.weight": ("U8", [2048, 1])}),
    ],
    ids=[
        "remote-code",
        "unknown-model-type",
        "architecture-not-in-modeling-file",
        "two-architectures",
        "no-architectures",
        "unexplained-module",
        "unexplained-parameter",
        "legacy-renamed-key",
        "quantized-weight",
    ],
)
def test_unusual_checkpoints_are_unsure(llama_dir: Path, change: Any) -> None:
    config, tensors = _llama(llama_dir)
    assert transformers_bnb_targets(config, tensors, None) is not None
    change(config, tensors)
    assert transformers_bnb_targets(config, tensors, None) is None


def test_reading_does_not_import_transformers(llama_dir: Path) -> None:
    code = (
        "import json, sys\n"
        "from quantsave import _core\n"
        "from quantsave.convert.static_layout import transformers_bnb_targets\n"
        f"folder = {str(llama_dir)!r}\n"
        "config = json.load(open(folder + '/config.json'))\n"
        "header = _core.read_header(folder + '/model.safetensors')\n"
        "tensors = {n: (d, s) for n, d, s, *_ in header['tensors']}\n"
        "answer = transformers_bnb_targets(config, tensors, None)\n"
        "print(json.dumps([answer is not None, sorted(m for m in sys.modules if m.split('.')[0] in "
        "('transformers', 'diffusers', 'bitsandbytes'))]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [True, []]


def test_an_internal_error_is_not_taken_for_unsure(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in the reading propagates instead of silently sending the caller down the slow path."""
    config, tensors = _llama(llama_dir)

    def broken(self: Interpreter, ref: Any) -> Any:
        raise TypeError("a bug in the reading")

    monkeypatch.setattr(Interpreter, "layout", broken)
    with pytest.raises(TypeError, match="a bug in the reading"):
        transformers_bnb_targets(config, tensors, None)


@pytest.mark.parametrize("why", ["unexplained-key", "unreadable-source"])
def test_unsure_logs_its_reason(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, why: str
) -> None:
    config, tensors = _llama(llama_dir)
    if why == "unexplained-key":
        tensors["model.layers.0.self_attn.extra_proj.weight"] = ("F32", [64, 64])
        expect = "no module of 'model.layers.0.self_attn' holds"
    else:

        def missing(path: Path) -> str:
            raise FileNotFoundError(2, "No such file or directory", str(path))

        monkeypatch.setattr(static_keys, "read_text", missing)
        expect = "FileNotFoundError: [Errno 2] No such file or directory"
    with caplog.at_level(logging.DEBUG, logger="quantsave.convert"):
        assert transformers_bnb_targets(config, tensors, None) is None
    [record] = [r for r in caplog.records if r.name == "quantsave.convert"]
    assert record.levelno == logging.DEBUG
    assert record.getMessage().startswith("static layout of LlamaForCausalLM: unsure, ")
    assert expect in record.getMessage()


def test_cli_debug_shows_why_the_reading_was_unsure(
    llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def unsure(self: Interpreter, ref: Any) -> Any:
        raise _Unsure("a reason for the test")

    monkeypatch.setattr(Interpreter, "layout", unsure)
    line = "quantsave: debug: quantsave.convert: static layout of LlamaForCausalLM: unsure, a reason for the test"
    assert main(["convert", str(llama_dir), str(tmp_path / "plain"), "--quant", "nf4", "-q"]) == 0
    assert line not in capsys.readouterr().err
    assert main(["convert", str(llama_dir), str(tmp_path / "debug"), "--quant", "nf4", "-q", "--debug"]) == 0
    assert line in capsys.readouterr().err.splitlines()
    assert not logging.getLogger("quantsave").handlers  # only while the command runs
