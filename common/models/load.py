"""`load_adapter`: a diffusers pipeline directory or a built-in name -> the family's adapter.

Directories are read locally only: model_index.json names the pipeline class (which picks the adapter)
and, per component, the library (diffusers or transformers) and class to load it with from its
sub-folder. Weights are read from safetensors only. No hub access.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from common.config import require
from common.models.base import DiffusionAdapter
from common.models.flux import FluxAdapter
from common.models.sd import SDAdapter
from common.models.sd3 import SD3Adapter

#: pipeline class in model_index.json -> adapter class
ADAPTERS = {
    "StableDiffusionPipeline": SDAdapter,
    "StableDiffusionXLPipeline": SDAdapter,
    "StableDiffusion3Pipeline": SD3Adapter,
    "FluxPipeline": FluxAdapter,
}
#: built-in names; the tiny ones live in common.models.tiny, the toy ones in common.models.toy
NAMES = ("tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux", "toy-unet", "toy-flow")
_LIBRARIES = ("diffusers", "transformers")


def require_model(model: str, field: str = "model") -> None:
    """Config validation for a model field: a built-in name or a diffusers pipeline directory, else
    ValueError("field: reason") (common.config.require), so a bad path stops before anything loads."""
    require(model in NAMES or (Path(model) / "model_index.json").is_file(), field,
            f"{model!r} is neither a built-in name ({', '.join(NAMES)}) nor a diffusers directory with "
            "model_index.json")


def load_adapter(path_or_name: str | Path, dtype: torch.dtype | None = None, device=None,
                 **adapter_kwargs) -> DiffusionAdapter:
    """Load a pipeline directory (or build a named tiny/toy model) as a DiffusionAdapter.

    dtype/device: applied to every torch module (e.g. torch.bfloat16, "cuda"). adapter_kwargs go to
    the adapter's constructor (e.g. resolution=512) when loading a directory.
    """
    name = str(path_or_name)
    if name in NAMES:
        adapter = _builtin(name)
        _move(adapter, dtype, device)
        return adapter
    root = Path(path_or_name)
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise ValueError(f"{name} is not a diffusers pipeline directory: no model_index.json "
                         f"(built-in names: {', '.join(NAMES)})")
    index = json.loads(index_file.read_text())
    pipeline = index.get("_class_name")
    if pipeline not in ADAPTERS:
        raise ValueError(f"{index_file}: _class_name {pipeline!r} has no adapter (supported: {', '.join(ADAPTERS)})")
    components = {key: _load_component(root / key, spec, dtype)
                  for key, spec in index.items() if not key.startswith("_") and isinstance(spec, list)}
    adapter = ADAPTERS[pipeline].from_pipeline_components(components, **adapter_kwargs)
    _move(adapter, None, device)
    return adapter


def _load_component(folder: Path, spec: list, dtype: torch.dtype | None):
    library, class_name = spec
    if library is None or class_name is None:
        return None
    if library not in _LIBRARIES:
        raise ValueError(f"{folder.parent / 'model_index.json'}: component {folder.name!r} comes from "
                         f"{library!r}; only {', '.join(_LIBRARIES)} components are loaded")
    cls = getattr(importlib.import_module(library), class_name)
    if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
        # safetensors only: unpickling a .bin checkpoint can run code
        kwargs = {"torch_dtype": dtype} if dtype is not None else {}
        return cls.from_pretrained(folder, local_files_only=True, use_safetensors=True, **kwargs)
    return cls.from_pretrained(folder, local_files_only=True)


def _builtin(name: str) -> DiffusionAdapter:
    if name.startswith("toy-"):
        from common.models.toy import load_toy_base  # written on top of the SD/SD3 adapters

        return load_toy_base(name.removeprefix("toy-"))
    from common.models import tiny

    return {"tiny-sd": tiny.tiny_sd, "tiny-sdxl": tiny.tiny_sdxl, "tiny-sd3": tiny.tiny_sd3,
            "tiny-flux": tiny.tiny_flux}[name]()


def _move(adapter: DiffusionAdapter, dtype: torch.dtype | None, device) -> None:
    if dtype is None and device is None:
        return
    for component in adapter.pipeline_components().values():
        if isinstance(component, torch.nn.Module):
            component.to(device=device, dtype=dtype)
