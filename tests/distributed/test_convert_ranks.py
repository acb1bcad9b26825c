"""``convert`` on every rank of a gloo group (2 and 3 processes): the ops (tensors read,
quantized, written) split across ranks into the same shared files, the output byte for byte the
one-process conversion; a rank that cannot see the source fails every rank, naming it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import workers
from launch import launch, outcome

import quantsave

CONVERTS = list(workers.CONVERTS)


@pytest.fixture(scope="module", params=[2, 3], ids=["2-ranks", "3-ranks"])
def converted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    world = request.param
    out = tmp_path_factory.mktemp(f"convert{world}")
    workers.write_sources(out)
    codes = launch(world, [*CONVERTS, "convert-hidden-src", "mismatch-threads"], out,
                   env={"QUANTSAVE_DIST_TIMEOUT": "60"})  # fmt: skip
    assert codes == [0] * world, codes
    return world, out


@pytest.mark.parametrize("case", CONVERTS)
def test_conversion_is_the_single_process_one(case: str, converted: tuple[int, Path], tmp_path: Path) -> None:
    world, out = converted
    for r in range(world):
        got = outcome(out, case, r)
        assert got["ok"], got.get("trace")
    src, config, shard, extra = workers.CONVERTS[case]
    args = workers.convert_arguments(out, extra)
    quantsave.convert(out / src, tmp_path / "ref", config, max_shard_size=shard, **args)
    names = sorted(os.listdir(tmp_path / "ref"))
    assert names == sorted(os.listdir(out / case))
    for name in names:
        assert (tmp_path / "ref" / name).read_bytes() == (out / case / name).read_bytes(), name
    assert not [p for p in out.iterdir() if p.name.startswith(f".{case}.")], "a staging folder was left"


def test_rank_that_cannot_see_the_source_fails_every_rank(converted: tuple[int, Path]) -> None:
    world, out = converted
    for r in range(world):
        got = outcome(out, "convert-hidden-src", r)
        assert not got["ok"], got
        if r == 1:
            assert got["type"] == "FileNotFoundError"
            assert any("raised on rank 1" in n for n in got["notes"])
        else:
            assert got["type"] == "DistributedError"
            assert "rank 1 failed during the reading of the source: FileNotFoundError" in got["error"]
    assert not (out / "convert-hidden-src").exists()


def test_ranks_with_different_torch_threads_fail(converted: tuple[int, Path]) -> None:
    """torch's float32 mean, which a double-quant offset records, depends on torch's thread
    count: ranks that differ would write a mix, so they are refused."""
    world, out = converted
    for r in range(world):
        got = outcome(out, "mismatch-threads", r)
        assert not got["ok"] and got["type"] == "DistributedError", got
        assert "rank 1: torch threads" in got["error"]
    assert not (out / "mismatch-threads").exists()
