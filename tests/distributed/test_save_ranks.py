"""``save_quantized`` on every rank of a gloo group (2 and 3 processes on the CPU): FSDP2- and
tensor-parallel-sharded tiny Llama and SD3 transformer, nf4 + double quant, nf4 and int8
quantized on the way, float, and replicated quantized models, sharded and single-file outputs.
Each folder must be byte for byte the single-process save of the same model; then the failure
cases (different arguments, a rank killed mid-save, a rank that never comes) and the memory a
rank needs."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import workers
from launch import launch, outcome

CASES = list(workers.CASES)


def _same_folder(a: Path, b: Path) -> None:
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reference")
    for case in CASES:
        workers.reference(case, root / case)
    return root


@pytest.fixture(scope="module", params=[2, 3], ids=["2-ranks", "3-ranks"])
def ranks_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    world = request.param
    out = tmp_path_factory.mktemp(f"ranks{world}")
    scenarios = [*CASES, "mismatch"]
    codes = launch(world, scenarios, out, env={"QUANTSAVE_DIST_TIMEOUT": "60"})
    assert codes == [0] * world, codes
    return world, out


@pytest.mark.parametrize("case", CASES)
def test_folder_is_the_single_process_save(case: str, ranks_run: tuple[int, Path], references: Path) -> None:
    world, out = ranks_run
    for r in range(world):
        got = outcome(out, case, r)
        assert got["ok"], got.get("trace")
    _same_folder(out / case, references / case)
    assert not [p for p in out.iterdir() if p.name.startswith(f".{case}.")], "a staging folder was left"


def test_sharded_outputs_are_really_sharded(ranks_run: tuple[int, Path]) -> None:
    _, out = ranks_run
    assert (out / "llama-tp-int8" / "model.safetensors.index.json").is_file()
    assert (out / "sd3-fsdp-int8-one-file" / "diffusion_pytorch_model.safetensors").is_file()


def test_transformers_and_diffusers_load_the_results(ranks_run: tuple[int, Path], diffusers_bnb_on_cpu: None) -> None:
    import diffusers
    import transformers

    _, out = ranks_run
    llama = transformers.AutoModelForCausalLM.from_pretrained(out / "llama-fsdp-nf4dq", device_map="cpu")
    assert type(llama.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert llama.is_quantized
    reference = workers.llama()
    ids = torch.tensor([[1, 5, 9, 33, 64, 2]])
    with torch.no_grad():
        got, want = llama(ids).logits, reference(ids).logits
    # nf4 changes the logits a little, not their meaning.
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.95
    int8 = transformers.AutoModelForCausalLM.from_pretrained(out / "llama-tp-int8", device_map="cpu")
    assert type(int8.model.layers[1].mlp.down_proj).__name__ == "Linear8bitLt"
    sd3 = diffusers.SD3Transformer2DModel.from_pretrained(
        out / "sd3-fsdp-nf4", device_map="cpu", torch_dtype=torch.float32
    )
    assert type(sd3.transformer_blocks[0].attn.to_q).__name__ == "Linear4bit"


def test_different_arguments_fail_on_every_rank(ranks_run: tuple[int, Path]) -> None:
    world, out = ranks_run
    for r in range(world):
        got = outcome(out, "mismatch", r)
        assert not got["ok"] and got["type"] == "DistributedError", got
        assert "rank 1: max_shard_size" in got["error"]
    assert not (out / "mismatch").exists()


def test_rank_memory_stays_near_its_share(tmp_path: Path) -> None:
    """Each of 2 ranks saving a 315 MB FSDP2-sharded model as nf4 needs far less than the model:
    its own shards (already held) plus a gathered layer at a time and the quantized layers it
    owns; gathering the full state dict on a rank would need the whole 315 MB more."""
    codes = launch(2, ["memory"], tmp_path, env={"QUANTSAVE_DIST_TIMEOUT": "60"})
    assert codes == [0, 0], codes
    for r in range(2):
        got = outcome(tmp_path, "memory", r)
        assert got["ok"], got
        grew = got["hwm"] - got["rss_before"]
        print(f"rank {r}: peak grew by {grew / 1e6:.0f} MB saving a {got['model_bytes'] / 1e6:.0f} MB model")
        assert grew < 0.5 * got["model_bytes"], (grew, got["model_bytes"])


def test_killed_rank_leaves_the_old_checkpoint(tmp_path: Path) -> None:
    codes = launch(2, ["kill"], tmp_path, env={"QUANTSAVE_DIST_TIMEOUT": "60"})
    assert codes[1] == 3, codes  # rank 1 died mid-write
    got = outcome(tmp_path, "kill", 0)
    assert not got["ok"] and got["type"] == "DistributedError", got
    assert "rank(s) [1] exited" in got["error"]
    old = tmp_path / "old"
    import quantsave

    quantsave.save_quantized(workers.llama(), old, quantization_config=workers.NF4, max_shard_size="40KB")
    _same_folder(tmp_path / "kill", old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kill", "kill.rank0.json", "old"]


def test_rank_that_never_comes_is_an_error_within_the_timeout(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    codes = launch(2, ["stall"], tmp_path, env={"QUANTSAVE_DIST_TIMEOUT": "4"})
    assert codes == [0, 0], codes
    got = outcome(tmp_path, "stall", 0)
    assert not got["ok"] and got["type"] == "DistributedError", got
    assert "not every one of the group's 2 ranks started the save within 4 s" in got["error"]
    assert got["seconds"] < 4 + 6
    assert not (tmp_path / "stall").exists()
    assert time.perf_counter() - t0 < 120
