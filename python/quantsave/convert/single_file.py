"""An original single-file checkpoint (Flux, SD3, ...) as a ``convert`` source: its keys mapped
by diffusers' own single-file conversion function (the one ``from_single_file`` runs for the model
class), recorded on meta tensors (``convert.recipes``) and replayed tensor by tensor over the
memory map while writing; the model built as ``from_single_file`` builds it (``from_config`` of
the diffusers config ``model_config`` names)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantsave.checkpoint.reader import open_checkpoint
from quantsave.checkpoint.tensors import NAME_TO_DTYPE, dtype_name
from quantsave.convert.recipes import Leaf, Recipe, Unrecordable, evaluate, held, leaves, record
from quantsave.convert.source import Source
from quantsave.errors import CheckpointError
from quantsave.load import _empty_weights

__all__ = ["read_single_file"]

logger = logging.getLogger("quantsave")


def read_single_file(
    path: Path, model_class: str | type, model_config: str | Path | None
) -> tuple[Source, nn.Module]:
    """The source (diffusers keys) and the empty model for original single file ``path``.

    Raises:
        ValueError: ``model_class`` is not a class diffusers' ``from_single_file`` reads, or
            ``model_config`` is missing or holds no config for it.
        CheckpointError: a corrupt file, or one the conversion function does not understand.
    """
    try:
        import diffusers
        from diffusers.loaders import single_file_model as sfm
    except ImportError as e:
        raise ImportError("converting a single-file checkpoint needs diffusers: pip install diffusers") from e
    cls: Any = getattr(diffusers, model_class, None) if isinstance(model_class, str) else model_class
    mapping = sfm._get_single_file_loadable_mapping_class(cls) if isinstance(cls, type) else None  # type: ignore[no-untyped-call]
    if mapping is None:
        raise ValueError(
            f"model_class={model_class!r} is not a diffusers class from_single_file reads; one of "
            f"{', '.join(sfm.SINGLE_FILE_LOADABLE_CLASSES)}"
        )
    if model_config is None:
        raise ValueError(
            "a single-file checkpoint needs model_config: the folder of the diffusers model's config.json "
            "(or a pipeline folder holding it), as from_single_file(config=...)"
        )
    functions: dict[str, Any] = sfm.SINGLE_FILE_LOADABLE_CLASSES[mapping]  # type: ignore[assignment]
    config_dir = Path(model_config)
    subfolder = None
    if not (config_dir / "config.json").is_file():
        sub = functions.get("default_subfolder")
        if sub is None or not (config_dir / sub / "config.json").is_file():
            where = f" or {config_dir / sub}" if sub else ""
            raise ValueError(f"model_config: no config.json in {str(config_dir)!r}{where}")
        subfolder = sub
    config = cls.load_config(str(config_dir), subfolder=subfolder, local_files_only=True)
    with _empty_weights():
        model = cls.from_config(config)

    ckpt = open_checkpoint(path)
    if ckpt.index is not None or len(ckpt.files) != 1:
        raise ValueError(f"{str(path)!r} is not one .safetensors file (model_class= converts an original single file)")
    specs: dict[str, tuple[torch.dtype, list[int]]] = {}
    for key, info in ckpt.tensors.items():
        if info.dtype not in NAME_TO_DTYPE:
            raise CheckpointError(f"invalid checkpoint file {info.file}: tensor {key!r} has dtype {info.dtype}")
        specs[key] = (NAME_TO_DTYPE[info.dtype], info.shape)
    expected = model.state_dict()
    if sfm._should_convert_state_dict_to_diffusers(expected, specs):  # type: ignore[no-untyped-call]
        convert = functions["checkpoint_mapping_fn"]

        def mapped(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return convert(config=config, checkpoint=checkpoint)  # type: ignore[no-any-return]

        try:
            recipes = record(mapped, specs)
        except Unrecordable as e:
            # The reference's own loading: the converter on the real (memory-mapped) tensors.
            logger.warning(
                "%s's conversion of %s needs tensor values (%s); converting it with the tensors in memory",
                mapping, path.name, e,
            )  # fmt: skip
            try:
                converted = mapped(ckpt.state_dict())
            except (KeyError, IndexError, ValueError, RuntimeError) as err:
                raise _not_understood(path, mapping, err) from err
            recipes = {k: (held(t), t.dtype, list(t.shape)) for k, t in converted.items()}
        except (KeyError, IndexError, ValueError) as e:
            raise _not_understood(path, mapping, e) from e
    else:
        recipes = {k: (Leaf(k), dt, shape) for k, (dt, shape) in specs.items()}
    return _source(path, ckpt, recipes), model


def _not_understood(path: Path, mapping: str, e: BaseException) -> CheckpointError:
    return CheckpointError(
        f"{path}: diffusers' single-file conversion for {mapping} does not understand this checkpoint "
        f"({type(e).__name__}: {e}); is it an original {mapping} file?"
    )


def _source(path: Path, ckpt: Any, recipes: dict[str, tuple[Recipe, torch.dtype, list[int]]]) -> Source:
    """The converted keys as a ``Source``: a whole stored tensor under a new name is read by the
    Rust converter (``names``); anything else is made by replaying its recipe."""
    source = Source(path.parent, list(ckpt.files), {}, None, ckpt)
    for key, (recipe, dtype, shape) in recipes.items():
        source.tensors[key] = (0, dtype_name(dtype, key), shape)
        if isinstance(recipe, Leaf):
            source.names[key] = recipe.key
            continue
        source.derived[key] = _replay(source, recipe)
        source.stored[key] = leaves(recipe)
    return source


def _replay(source: Source, recipe: Recipe) -> Any:
    reads = leaves(recipe)

    def make(dtype: torch.dtype | None) -> torch.Tensor:
        t = evaluate(recipe, source.mapped)
        # A fresh tensor (a concatenation, a cast) is handed over as it is; a view of the map,
        # or a tensor the recipe holds (made by a converter that needs values), is copied.
        mapped = {source.mapped(k).untyped_storage().data_ptr() for k in reads}
        copy = not reads or t.untyped_storage().data_ptr() in mapped
        return t.to(dtype=dtype or t.dtype, copy=copy)

    return make
