"""Checkpoint-level atomic saves: a multi-shard save over an existing checkpoint, killed with
SIGKILL at random moments, always leaves a folder that loads and equals the old or the new model
exactly; two processes saving into one folder leave one complete checkpoint; a failed save keeps
the old one; files the save does not write carry over; leftover staging folders are ignored by
loads and removed by the next save."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import quantsave as qs
from quantsave import _core
from quantsave.checkpoint.commit import staged_directory, stale_stages

SHARD = "400KB"


def model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(256, 256) for _ in range(24)])  # ~6.3 MB: 16 shards of 400 KB


def state(folder: Path) -> dict[str, torch.Tensor]:
    tensors, _config = qs.load_state_dict(folder)
    return {k: v.clone() for k, v in tensors.items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _save_child(seed: int, folder: str) -> None:
    qs.save_quantized(model(seed), folder, max_shard_size=SHARD)
    os._exit(0)


def stage_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.quantsave-"))


def test_sigkill_at_random_moments_leaves_old_or_new(tmp_path) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "ckpt"
    models = {seed: {k: v.detach().clone() for k, v in model(seed).state_dict().items()} for seed in (1, 2)}
    qs.save_quantized(model(1), folder, max_shard_size=SHARD)
    assert len(list(folder.glob("*.safetensors"))) > 10
    ctx = multiprocessing.get_context("fork")
    # How long one save takes in a forked child, to spread the kills over it.
    spans = []
    for seed in (2, 1, 2):
        t0 = time.perf_counter()
        p = ctx.Process(target=_save_child, args=(seed, str(folder)))
        p.start()
        p.join()
        spans.append(time.perf_counter() - t0)
        assert p.exitcode == 0 and same(state(folder), models[seed])
    span = sorted(spans)[1]
    rng = random.Random(0)
    outcomes = {"old": 0, "new": 0}
    current = 2
    trials = 0
    # At least 60 kills; more (up to 200) until both outcomes have occurred 5 times, the kill
    # window adapting to how long saves take on this machine right now.
    while trials < 60 or (min(outcomes.values()) < 5 and trials < 200):
        trials += 1
        new = 3 - current
        p = ctx.Process(target=_save_child, args=(new, str(folder)))
        p.start()
        time.sleep(rng.uniform(0, span * 1.2))
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        got = state(folder)
        if same(got, models[new]):
            outcomes["new"] += 1
            current = new
            span *= 0.95
        else:
            assert same(got, models[current]), "the folder holds neither the old nor the new checkpoint"
            outcomes["old"] += 1
            span *= 1.05
        # Nothing from a killed save shows inside the folder.
        assert not [n for n in os.listdir(folder) if n.endswith(".tmp")]
    # Both outcomes occurred: kills landed before and after the commit.
    assert outcomes["old"] >= 5 and outcomes["new"] >= 5, outcomes
    # The next save removes the staging folders killed saves left beside the target.
    qs.save_quantized(model(1), folder, max_shard_size=SHARD)
    assert stage_leftovers(folder) == [] and same(state(folder), models[1])


def test_concurrent_saves_leave_one_complete_checkpoint(tmp_path) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "ckpt"
    models = {seed: {k: v.detach().clone() for k, v in model(seed).state_dict().items()} for seed in (1, 2, 3)}
    qs.save_quantized(model(3), folder, max_shard_size=SHARD)
    ctx = multiprocessing.get_context("fork")
    for _ in range(5):
        procs = [ctx.Process(target=_save_child, args=(seed, str(folder))) for seed in (1, 2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
            assert p.exitcode == 0
        got = state(folder)
        assert same(got, models[1]) or same(got, models[2])
        assert stage_leftovers(folder) == []


def test_failed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "ckpt"
    qs.save_quantized(model(1), folder, max_shard_size=SHARD)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    calls = {"n": 0}
    real = _core.write_shards

    def failing(batch, **kw):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real(batch, **kw)

    monkeypatch.setattr(_core, "write_shards", failing)
    with pytest.raises(OSError, match="No space"):
        qs.save_quantized(model(2), folder, max_shard_size=SHARD, progress=True)  # shard by shard
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert stage_leftovers(folder) == []


def test_unwritten_files_carry_over_and_stale_ones_go(tmp_path) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "ckpt"
    qs.save_quantized(model(1), folder, max_shard_size=SHARD)
    (folder / "tokenizer.json").write_text("{}")
    (folder / "extra").mkdir()
    (folder / "extra" / "notes.txt").write_text("keep me")
    inode = (folder / "tokenizer.json").stat().st_ino
    qs.save_quantized(model(2), folder)  # one file now: the shards and the index are stale
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["extra", "model.safetensors", "tokenizer.json"]
    assert (folder / "extra" / "notes.txt").read_text() == "keep me"
    assert (folder / "tokenizer.json").stat().st_ino == inode  # linked over, not copied
    assert same(state(folder), {k: v.detach() for k, v in model(2).state_dict().items()})


def test_rewritten_files_are_not_linked_into_the_stage(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # A file the save writes anew is left out of the stage (no rename over a link, which makes
    # ext4 flush the new file at once); the old folder's file is never touched either way.
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"old weights")
    (folder / "README.md").write_text("card")
    old = folder / "model.safetensors"
    inode = old.stat().st_ino
    with open(old, "rb") as reader:
        with pytest.raises(RuntimeError), staged_directory(folder, rewritten=["model.safetensors"]) as stage:
            assert not (stage / "model.safetensors").exists()
            assert (stage / "README.md").stat().st_ino == (folder / "README.md").stat().st_ino
            raise RuntimeError("the save fails")
        assert (folder / "model.safetensors").read_bytes() == b"old weights"
        with staged_directory(folder, rewritten=["model.safetensors", "absent.json"]) as stage:
            (stage / "model.safetensors").write_bytes(b"new weights")
        assert reader.read() == b"old weights"  # an open reader keeps the old file
    assert (folder / "model.safetensors").read_bytes() == b"new weights"
    assert (folder / "model.safetensors").stat().st_ino != inode
    assert (folder / "README.md").read_text() == "card"
    assert stage_leftovers(folder) == []


def test_symlinked_target_and_no_exchange(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    real = tmp_path / "real"
    qs.save_quantized(model(1), real, max_shard_size=SHARD)
    link = tmp_path / "link"
    link.symlink_to(real)
    qs.save_quantized(model(2), link, max_shard_size=SHARD)
    assert link.is_symlink() and same(state(real), {k: v.detach() for k, v in model(2).state_dict().items()})
    # A filesystem without atomic exchange: two renames, same result.
    monkeypatch.setattr(_core, "exchange_paths", lambda a, b: False)
    qs.save_quantized(model(3), real, max_shard_size=SHARD)
    assert same(state(real), {k: v.detach() for k, v in model(3).state_dict().items()})
    assert stage_leftovers(real) == [] and stale_stages(real) == []


def test_convert_commits_atomically(llama_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("transformers")
    out = tmp_path / "out"
    qs.convert(llama_dir, out, qs.BitsAndBytesConfig(load_in_4bit=True), max_shard_size="60KB")
    (out / "README.md").write_text("model card")
    qs.convert(llama_dir, out, qs.BitsAndBytesConfig(load_in_8bit=True))
    assert (out / "README.md").read_text() == "model card"
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    assert stage_leftovers(out) == []


def test_leftover_file_temporaries_are_ignored_and_dropped(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A temporary left by an interrupted write inside the folder: loads ignore it, the next
    save does not carry it over."""
    folder = tmp_path / "ckpt"
    qs.save_quantized(model(1), folder, max_shard_size=SHARD)
    junk = folder / ".model-00001-of-00016.safetensors.999999-3.quantsave.tmp"
    junk.write_bytes(b"half a shard")
    assert same(state(folder), {k: v.detach() for k, v in model(1).state_dict().items()})
    qs.save_quantized(model(2), folder, max_shard_size=SHARD)
    assert not junk.exists() and not [n for n in os.listdir(folder) if n.endswith(".tmp")]


def test_mount_point_is_written_in_place(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A mount point cannot be renamed: its files are replaced in place (each atomically)."""
    import quantsave.checkpoint.commit as commit

    folder = tmp_path / "ckpt"
    qs.save_quantized(model(1), folder, max_shard_size=SHARD)
    inode = folder.stat().st_ino
    qs.save_quantized(model(2), folder, max_shard_size=SHARD)
    assert folder.stat().st_ino != inode  # staged: a new folder was swapped in
    inode = folder.stat().st_ino
    real = commit.os.path.ismount
    monkeypatch.setattr(commit.os.path, "ismount", lambda p: Path(p) == folder or real(p))
    qs.save_quantized(model(3), folder, max_shard_size=SHARD)
    assert folder.stat().st_ino == inode
    assert same(state(folder), {k: v.detach() for k, v in model(3).state_dict().items()})
    assert stage_leftovers(folder) == []


def test_stale_stage_of_a_reused_pid_is_removed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A container restarts with the same pid: its dead save's stage is unlocked, hence stale."""
    folder = tmp_path / "ckpt"
    qs.save_quantized(model(1), folder, max_shard_size=SHARD)
    stale = tmp_path / f".ckpt.quantsave-{os.getpid()}-0123456789ab.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    qs.save_quantized(model(2), folder, max_shard_size=SHARD)
    assert not stale.exists() and stage_leftovers(folder) == []


def test_files_created_during_the_save_survive(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "ckpt"
    qs.save_quantized(model(1), folder, max_shard_size=SHARD)
    real = _core.write_shards

    def meanwhile(batch, **kw):  # type: ignore[no-untyped-def]
        (folder / "trainer_state.json").write_text("{}")  # another program, mid-save
        return real(batch, **kw)

    monkeypatch.setattr(_core, "write_shards", meanwhile)
    qs.save_quantized(model(2), folder)  # one file: the old shards are stale
    assert (folder / "trainer_state.json").read_text() == "{}"
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "trainer_state.json"]


def test_folder_moved_aside_by_a_killed_fallback_is_restored(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Killed between the two renames of the no-exchange fallback: the next save puts the old
    folder back first, so nothing it held is lost."""
    folder = tmp_path / "ckpt"
    qs.save_quantized(model(1), folder, max_shard_size=SHARD)
    (folder / "README.md").write_text("card")
    os.rename(folder, tmp_path / ".ckpt.quantsave-old-999999-00aa.tmp")
    qs.save_quantized(model(2), folder, max_shard_size=SHARD)
    assert (folder / "README.md").read_text() == "card"
    assert same(state(folder), {k: v.detach() for k, v in model(2).state_dict().items()})
    assert stage_leftovers(folder) == []


def test_current_folder_as_target(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "ckpt"
    qs.save_quantized(model(1), folder, max_shard_size=SHARD)
    monkeypatch.chdir(folder)
    qs.save_quantized(model(2), ".", max_shard_size=SHARD)
    assert same(state(folder), {k: v.detach() for k, v in model(2).state_dict().items()})
    assert stage_leftovers(folder) == []


def test_mount_point_inside_the_target_is_never_crossed(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import quantsave.checkpoint.commit as commit

    folder = tmp_path / "ckpt"
    qs.save_quantized(model(1), folder, max_shard_size=SHARD)
    (folder / "data").mkdir()
    (folder / "data" / "big.bin").write_bytes(b"mounted")
    inode = folder.stat().st_ino
    # As /proc/self/mountinfo would list a (bind) mount there.
    monkeypatch.setattr(commit, "_mount_points", lambda: ["/", os.path.realpath(folder / "data")])
    qs.save_quantized(model(2), folder, max_shard_size=SHARD)
    assert folder.stat().st_ino == inode and (folder / "data" / "big.bin").read_bytes() == b"mounted"
    assert same(state(folder), {k: v.detach() for k, v in model(2).state_dict().items()})
