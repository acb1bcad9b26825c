"""The sweep's fixed sample (``python tools/sweep.py --sample``): dense, MoE, encoder,
encoder-decoder, GPT-2 ``Conv1D``, Mamba and hybrid transformers models, and diffusers DiT, UNet and
VAE classes. For each case, ``convert`` and ``save_quantized`` write the reference's files and
``load_quantized`` of the reference's folder gives its outputs (``tools/sweep.py`` holds the
comparisons; a column the reference cannot judge is ``n/a``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import sweep
import sweep_models

#: Sample cases that fail today because of a confirmed quantsave bug (strict: each turns into a
#: failure once fixed, so the entry is removed with the fix). None today.
KNOWN_BUGS: dict[str, str] = {}


def _param(name: str) -> object:
    if name in KNOWN_BUGS:
        return pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[name]))
    return name


@pytest.mark.parametrize("name", [_param(n) for n in sweep_models.SAMPLE])
def test_sample_case(name: str, tmp_path: Path) -> None:
    result = sweep.run_case(sweep.Case.parse(name), tmp_path)
    assert result.columns["reference"].state == "ok", result.columns["reference"].cell()
    failed = {c: o.cell() for c, o in result.columns.items() if o.state == "FAIL"}
    assert failed == {}


def test_sample_is_in_the_sweep() -> None:
    """Every sample case names a model and config the full sweep covers."""
    models = set(sweep.all_models("all"))
    for name in sweep_models.SAMPLE:
        case = sweep.Case.parse(name)
        assert case.model in models and case.config in sweep.CONFIGS, name
        assert sweep.Case.parse(case.name) == case
