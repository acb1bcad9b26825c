"""The ``quantsave`` command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import quantsave
from quantsave import _core
from quantsave.cli import main


def test_demo_runs_and_reports(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "tiny"
    assert main(["demo", "--out", str(out), "--max-shard-size", "500KB"]) == 0
    text = capsys.readouterr().out
    assert "outputs match" in text and "yes" in text
    assert (out / "config.json").is_file() and (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1


def test_console_script_help() -> None:
    done = subprocess.run([sys.executable, "-m", "quantsave", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "demo" in done.stdout


def test_bad_usage_exit_code() -> None:
    done = subprocess.run([sys.executable, "-m", "quantsave", "nope"], capture_output=True, text=True)
    assert done.returncode == 2


def test_bad_input_is_one_line_error(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["demo", "--max-shard-size", "lots"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("quantsave: error:") and "invalid size" in err and "Traceback" not in err


# --- inspect / verify -------------------------------------------------------------------------

def _nf4_checkpoint(out: Path, *, layers: int = 4, max_shard_size: str | None = "3KB") -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(layers)])
    quantsave.quantize(model, quantsave.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    quantsave.save_quantized(model, out, max_shard_size=max_shard_size)
    return out


@pytest.fixture()
def sharded(tmp_path: Path) -> Path:
    out = _nf4_checkpoint(tmp_path / "nf4")
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    return out


def _run(capsys, *argv: str) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_inspect_json_numbers(sharded: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    rc, out, _ = _run(capsys, "inspect", str(sharded), "--json")
    assert rc == 0
    s = json.loads(out)
    state_dict, _ = quantsave.load_state_dict(sharded)
    files = sorted(sharded.glob("model-*.safetensors"))
    assert s["tensor_count"] == len(state_dict) == len(s["tensors"])
    assert s["tensor_bytes"] == sum(t.numel() * t.element_size() for t in state_dict.values())
    assert [sh["file"] for sh in s["shards"]] == [f.name for f in files]
    assert s["disk_bytes"] == sum(f.stat().st_size for f in files)
    assert s["index"] == "model.safetensors.index.json"
    assert s["quant_method"] == "bitsandbytes" and s["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    # 4 x (64*64 weight + 64 bias) logical parameters in float32
    assert s["parameters"] == 4 * (64 * 64 + 64) and s["float_dtype"] == "float32"
    assert s["float_bytes"] == 4 * s["parameters"]
    assert s["compression_ratio"] == pytest.approx(s["float_bytes"] / s["disk_bytes"], rel=1e-3)
    assert s["compression_ratio"] > 4 and "quant_state" in s["ratio_method"]
    assert s["dtypes"]["U8"]["tensors"] == 8  # packed weight + quant_state per layer


def test_inspect_8bit_counts_int8_elements(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    quantsave.quantize(model, quantsave.BitsAndBytesConfig(load_in_8bit=True))
    quantsave.save_quantized(model, tmp_path / "int8")
    rc, out, _ = _run(capsys, "inspect", str(tmp_path / "int8"), "--json")
    s = json.loads(out)
    assert rc == 0 and s["parameters"] == 64 * 32 + 32 and s["tensor_count"] == 4


def test_inspect_table(sharded: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    rc, out, err = _run(capsys, "inspect", str(sharded), "--tensors")
    assert rc == 0 and err == ""
    for text in ("tensors", "shards", "U8", "F32", "quantization bitsandbytes", "compression", "computed as"):
        assert text in out
    assert "0.weight.quant_state.bitsandbytes__nf4" in out


def test_verify_ok(sharded: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    rc, out, err = _run(capsys, "verify", str(sharded))
    assert rc == 0 and out.startswith("ok:") and err == ""
    assert _run(capsys, "verify", str(sharded), "--quiet") == (0, "", "")


def test_verify_truncated_shard(sharded: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    rc, out, err = _run(capsys, "verify", str(sharded))
    assert rc == 1 and shard.name in out and "truncated" in out and "Traceback" not in out + err
    assert len(out.strip().splitlines()) == 1  # one line for the shard, not one per tensor it holds


def test_verify_flipped_header_bytes(sharded: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\xff\xfe\x00\x01"  # the JSON header's first bytes
    shard.write_bytes(bytes(data))
    rc, out, _ = _run(capsys, "verify", str(sharded))
    assert rc == 1 and shard.name in out


def test_verify_index_problems(sharded: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    index = sharded / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["ghost.weight"] = data["weight_map"]["0.bias"]
    data["weight_map"]["escape.weight"] = "../outside.safetensors"
    first, second = (f.name for f in sorted(sharded.glob("model-*.safetensors"))[:2])
    moved = next(k for k, v in data["weight_map"].items() if v == second)
    data["weight_map"][moved] = first
    index.write_text(json.dumps(data))
    rc, out, _ = _run(capsys, "verify", str(sharded))
    assert rc == 1
    assert "'ghost.weight'" in out and "'../outside.safetensors'" in out and repr(moved) in out
    assert all(line.strip() for line in out.splitlines())


def test_verify_missing_shard(sharded: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    shard.unlink()
    rc, out, _ = _run(capsys, "verify", str(sharded))
    assert rc == 1 and shard.name in out and "does not exist" in out


def test_verify_config_problems(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    ckpt = _nf4_checkpoint(tmp_path / "single", layers=1, max_shard_size=None)
    config = ckpt / "config.json"
    config.write_text("{not json")
    rc, out, _ = _run(capsys, "verify", str(ckpt))
    assert rc == 1 and "config.json" in out and "not valid JSON" in out

    config.write_text(json.dumps({"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}}))
    rc, out, _ = _run(capsys, "verify", str(ckpt))
    assert rc == 1 and "SCB" in out

    config.write_text(json.dumps({"quantization_config": {"quant_method": "no-such-method"}}))
    rc, out, _ = _run(capsys, "verify", str(ckpt))
    assert rc == 1 and "quantization_config" in out and "no-such-method" in out

    config.write_text(json.dumps({"quantization_config": {"load_in_4bit": True}}))
    rc, out, _ = _run(capsys, "verify", str(ckpt))
    assert rc == 1 and "quant_method" in out

    config.write_text(json.dumps({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                                          "bnb_4bit_quant_type": "fp4"}}))
    rc, out, _ = _run(capsys, "verify", str(ckpt))
    assert rc == 1 and "is not fp4" in out

    config.write_text("{}")
    rc, out, _ = _run(capsys, "verify", str(ckpt))
    assert rc == 1 and "no quantization_config" in out


def test_verify_bad_input_exit_2(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    rc, out, err = _run(capsys, "verify", str(tmp_path / "missing"))
    assert rc == 2 and out == "" and err.startswith("quantsave: error:") and len(err.splitlines()) == 1
    rc, _, err = _run(capsys, "verify", str(tmp_path))
    assert rc == 2 and "not a checkpoint" in err
    rc, _, err = _run(capsys, "inspect", str(tmp_path / "missing"))
    assert rc == 2 and "does not exist" in err and "Traceback" not in err


def test_verify_checksums_not_recorded(sharded: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    rc, out, err = _run(capsys, "verify", str(sharded), "--checksums")
    assert rc == 2 and out == "" and "no checksums are recorded" in err and len(err.splitlines()) == 1


def test_inspect_corrupt_is_one_line_and_debug_raises(sharded: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    rc, _, err = _run(capsys, "inspect", str(sharded))
    assert rc == 2 and shard.name in err and len(err.splitlines()) == 1
    with pytest.raises(ValueError):
        main(["--debug", "inspect", str(sharded)])
    with pytest.raises(ValueError):
        main(["inspect", str(sharded), "--debug"])


@pytest.mark.parametrize("command", ["inspect", "verify", "demo"])
def test_command_help_has_examples(command: str) -> None:
    done = subprocess.run([sys.executable, "-m", "quantsave", command, "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "examples:" in done.stdout and f"quantsave {command}" in done.stdout


def test_subprocess_verify_and_inspect(sharded: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "quantsave", "verify", str(sharded)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == ""  # no TTY: no progress bar
    done = subprocess.run(
        [sys.executable, "-m", "quantsave", "inspect", str(sharded), "--json"], capture_output=True, text=True
    )
    # per layer: weight, absmax, quant_map, quant_state, bias
    assert done.returncode == 0 and json.loads(done.stdout)["tensor_count"] == 4 * 5


def test_header_reader_agrees_with_inspect(sharded: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    _, out, _ = _run(capsys, "inspect", str(sharded), "--json")
    s = json.loads(out)
    for sh in s["shards"]:
        assert sh["tensors"] == len(_core.read_header(sharded / sh["file"])["tensors"])


def test_verify_double_quant_tensors_required(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    ckpt = _nf4_checkpoint(tmp_path / "single", layers=1, max_shard_size=None)
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"]["bnb_4bit_use_double_quant"] = True
    (ckpt / "config.json").write_text(json.dumps(config))
    rc, out, _ = _run(capsys, "verify", str(ckpt))
    assert rc == 1 and "'0.weight.nested_absmax'" in out and "'0.weight.nested_quant_map'" in out


def test_verify_shard_symlinked_outside_folder(  # type: ignore[no-untyped-def]
    sharded: Path, tmp_path: Path, capsys
) -> None:
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(outside)
    rc, out, _ = _run(capsys, "verify", str(sharded))
    assert rc == 1 and "not a file in the checkpoint folder" in out and shard.name in out


def test_inspect_and_verify_torchao(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    ao = pytest.importorskip("torchao.quantization")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    quantsave.quantize(model, quantsave.TorchAoConfig(ao.Int8WeightOnlyConfig()))
    quantsave.save_quantized(model, tmp_path / "ao")
    rc, out, _ = _run(capsys, "inspect", str(tmp_path / "ao"), "--json")
    s = json.loads(out)
    assert rc == 0 and s["quant_method"] == "torchao" and s["parameters"] == 2 * (64 * 64 + 64)
    assert s["float_dtype"] == "float32" and "torchao" in s["ratio_method"]
    assert _run(capsys, "verify", str(tmp_path / "ao"))[0] == 0


def test_convert_command(llama_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``quantsave convert`` writes what qs.convert writes; bad input exits 2 in one line."""
    import subprocess
    import sys

    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "quantsave", "convert", str(llama_dir), str(out), "--quant", "nf4", "--double-quant"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    quantsave.convert(
        llama_dir, tmp_path / "api",
        quantsave.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    )
    for f in ("model.safetensors", "config.json"):
        assert (out / f).read_bytes() == (tmp_path / "api" / f).read_bytes()
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "quantsave",
            "convert",
            str(tmp_path / "missing"),
            str(tmp_path / "x"),
            "--quant",
            "int8",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "quantsave: error:" in bad.stderr
    assert not (tmp_path / "x").exists()


def test_convert_command_pipeline_components(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``--components`` picks the pipeline components to convert; the rest is copied."""
    import subprocess
    import sys

    diffusers = pytest.importorskip("diffusers")

    class Pipe(diffusers.DiffusionPipeline):  # type: ignore[misc,name-defined]
        def __init__(self, first, second, scheduler) -> None:  # type: ignore[no-untyped-def]
            super().__init__()
            self.register_modules(first=first, second=second, scheduler=scheduler)

    torch.manual_seed(0)
    from conftest import TINY_UNET

    Pipe(
        diffusers.UNet2DModel(**TINY_UNET), diffusers.UNet2DModel(**TINY_UNET), diffusers.DDPMScheduler()
    ).save_pretrained(tmp_path / "src")
    proc = subprocess.run(
        [sys.executable, "-m", "quantsave", "convert", str(tmp_path / "src"), str(tmp_path / "out"),
         "--quant", "int8", "--components", "second", "--quiet"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr
    assert "quantization_config" in (tmp_path / "out" / "second" / "config.json").read_text()
    for name in (
        "first/diffusion_pytorch_model.safetensors",
        "first/config.json",
        "model_index.json",
        "scheduler/scheduler_config.json",
    ):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "src" / name).read_bytes(), name
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "quantsave",
            "convert",
            str(tmp_path / "src"),
            str(tmp_path / "x"),
            "--quant",
            "nf4",
            "--components",
            "nope",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "nope" in bad.stderr and not (tmp_path / "x").exists()
