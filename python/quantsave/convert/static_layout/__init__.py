"""``static_layout``: the Linear layers transformers' bitsandbytes quantization would replace in a
checkpoint, found by reading transformers' modeling source with ``ast`` instead of importing it.

The exact answer (``quantize.bnb_targets`` on a meta skeleton) costs an import of transformers'
modeling code, seconds of CPU. Here the ``__init__`` methods of the architecture class and of the
classes it builds are executed abstractly (both branches of every ``if``): each attribute gets the
set of kinds it can hold (nn.Linear, another torch layer, a transformers class, a ModuleList, a
parameter, unknown). Every checkpoint key (renamed first, when transformers renames it on load) is
walked from the architecture class down those attributes; a key no candidate kind explains, or
one that may or may not be an nn.Linear weight, makes the reading unsure. transformers' default
skips come from the same reading: ``_tied_weights_keys`` with ``tie_word_embeddings`` (from
config.json or the configuration class's default), the module of the last parameter (registration
order of the ``__init__``s, with the tied parameters save_pretrained leaves out),
``get_output_embeddings`` and ``_keep_in_fp32_modules``. A skip the reading is unsure of is
accepted only when the answer is the same with and without it.

When unsure, ``transformers_bnb_targets`` returns None (the caller builds the model) and logs the
reason at DEBUG on the ``quantsave.convert`` logger (``quantsave convert --debug`` shows it). Only
``unsure.UNSURE_ERRORS`` mean unsure; any other exception is a bug and propagates.

The modules, in the order the reading uses them:

- ``unsure``: ``Unsure`` and the other exceptions that mean unsure.
- ``kinds``: the abstract values (``Sym``) and the torch.nn layers whose state is known.
- ``source``: finding and parsing transformers' files (``Source``, ``Arch``).
- ``classes``: class lookup, bases, MRO, class attributes and methods (``ClassIndex``).
- ``values`` / ``interpret``: abstract execution of ``__init__`` (expressions / statements),
  giving each class's ``Layout``.
- ``keys``: transformers' renamings and the walk of the checkpoint's keys.
- ``skips``: transformers' default skip rules.
- ``answer``: the checks and the targets.

Never imports transformers, diffusers or bitsandbytes.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from quantsave.convert.static_layout.answer import answer
from quantsave.convert.static_layout.classes import ClassIndex
from quantsave.convert.static_layout.interpret import Interpreter
from quantsave.convert.static_layout.keys import refuse_legacy
from quantsave.convert.static_layout.source import Arch
from quantsave.convert.static_layout.unsure import UNSURE_ERRORS, Unsure

__all__ = ["transformers_bnb_targets"]

_Unsure = Unsure  # the name the tests catch
_log = logging.getLogger("quantsave.convert")


def transformers_bnb_targets(
    config: dict[str, Any],
    tensors: dict[str, tuple[str, list[int]]],
    skip_modules: list[str] | None,
) -> list[str] | None:
    """The modules ``bnb_targets`` would quantize in the transformers model of ``config``.

    Args:
        config: the checkpoint's parsed ``config.json``.
        tensors: every checkpoint key -> (safetensors dtype, shape).
        skip_modules: the BitsAndBytesConfig's ``llm_int8_skip_modules``.

    Returns:
        The sorted names of the ``nn.Linear`` modules whose ``.weight`` is in ``tensors`` and that
        ``bnb_targets(skeleton, config)`` returns, or None when the static reading is unsure
        (the reason is logged at DEBUG on ``quantsave.convert``).
    """
    try:
        return _static_targets(config, tensors, skip_modules)
    except UNSURE_ERRORS as e:
        reason = str(e) if isinstance(e, Unsure) else f"{type(e).__name__}: {e}"
        _log.debug("static layout of %s: unsure, %s", _arch_name(config), " ".join(reason.split()))
        return None


def _static_targets(
    config: dict[str, Any], tensors: dict[str, tuple[str, list[int]]], skip_modules: list[str] | None
) -> list[str]:
    """``transformers_bnb_targets`` that raises ``Unsure`` with the reason instead of returning None."""
    try:
        spec = importlib.util.find_spec("transformers")
    except ValueError as e:  # a transformers module in sys.modules without a __spec__
        raise Unsure(f"transformers has no module spec: {e}") from e
    if spec is None or not spec.submodule_search_locations:
        raise Unsure("transformers is not installed")
    if not isinstance(config, dict) or "auto_map" in config:
        raise Unsure("remote code (auto_map) or no config")
    archs, model_type = config.get("architectures"), config.get("model_type")
    if not (isinstance(archs, list) and len(archs) == 1 and isinstance(archs[0], str) and isinstance(model_type, str)):
        raise Unsure("config.json needs model_type and exactly one architecture")
    refuse_legacy(tensors)
    root = Path(next(iter(spec.submodule_search_locations)))
    arch = Arch.locate(root, config, model_type, archs[0])
    return answer(Interpreter(ClassIndex(root), arch), arch, tensors, skip_modules)


def _arch_name(config: Any) -> str:
    """The architecture a log line names: config.json's one ``architectures`` entry, else what it holds."""
    archs = config.get("architectures") if isinstance(config, dict) else None
    if isinstance(archs, list) and len(archs) == 1 and isinstance(archs[0], str):
        return archs[0]
    return f"architectures={archs!r}"
