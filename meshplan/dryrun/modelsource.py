"""Where ``meshplan explain`` and ``meshplan demo`` get a model from: presets, config files, model types.

A *model source* is one of

* a path to a Hugging Face ``config.json``, or to a folder holding one;
* a built-in preset (``meshplan/presets/<name>.json``: published ``config.json`` files of well-known
  models, e.g. ``llama3-405b``; list them with ``meshplan presets``);
* a ``transformers`` ``model_type`` (``llama``, ``qwen3``, ...), built with that type's defaults.

Overrides (``{"num_hidden_layers": 4, "text_config.vocab_size": 1024}``; dotted keys reach nested
configs) are applied on top. Nothing is ever downloaded. ``transformers`` is imported only when a
model or a model type is actually needed, never at ``import meshplan``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import MeshplanError
from ..core.naming import did_you_mean, normalize_name

PRESETS_DIR = "presets"  # package data of ``meshplan`` (see pyproject.toml)


class ModelSourceError(MeshplanError, ValueError):
    """A model source (path, preset or model type) or an override cannot be turned into a config."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved model source: the config as a plain dict, and a description of where it came from."""

    config: dict[str, Any]
    origin: str

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))


def _presets_root() -> Any:
    return resources.files("meshplan") / PRESETS_DIR


def _preset_files() -> dict[str, Any]:
    """``{normalized preset name: resource}`` for every JSON file shipped in ``meshplan/presets``."""
    return {normalize_name(item.name[:-5]): item for item in _presets_root().iterdir() if item.name.endswith(".json")}


def list_presets() -> list[dict[str, Any]]:
    """Every built-in preset: name, model type, architecture and the checkpoint its shape comes from."""
    rows = []
    for item in sorted(_presets_root().iterdir(), key=lambda i: i.name):
        if not item.name.endswith(".json"):
            continue
        data = json.loads(item.read_text())
        rows.append({
            "name": item.name[:-5],
            "model_type": data.get("model_type"),
            "architecture": (data.get("architectures") or [None])[0],
            "source": data.get("_name_or_path"),
        })
    return rows


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelSourceError(f"Cannot read model config {str(path)!r}: {exc}") from exc
    if not isinstance(data, dict) or "model_type" not in data:
        raise ModelSourceError(f"{str(path)!r} is not a Hugging Face config.json (it has no 'model_type').")
    return data


def _known_model_types() -> list[str]:
    from transformers import CONFIG_MAPPING  # loaded on use: keeps start-up light

    return list(CONFIG_MAPPING.keys())


def resolve_source(model: str) -> ModelSource:
    """Turn a path, preset name or model type into a :class:`ModelSource` (no overrides yet)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"Folder {model!r} holds no config.json.")
        path = path / "config.json"
    if path.is_file():
        return ModelSource(_read_json(path), f"config {path}")
    presets = _preset_files()
    if normalize_name(model) in presets:
        return ModelSource(json.loads(presets[normalize_name(model)].read_text()), f"preset {model}")
    known_types = _known_model_types()
    if model in known_types:
        return ModelSource({"model_type": model}, f"model type {model} (transformers defaults)")
    names = [row["name"] for row in list_presets()]
    raise ModelSourceError(
        f"Unknown model {model!r}: not a config.json path, a folder with one, a preset ({', '.join(names)}) "
        f"or a transformers model_type.{did_you_mean(model, names + known_types)}"
    )


def apply_overrides(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with ``overrides`` set; dotted keys (``text_config.vocab_size``) reach nested dicts."""
    result = copy.deepcopy(dict(config))
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = result
        for part in parents:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ModelSourceError(f"Cannot set {key!r}: {part!r} is a {type(child).__name__}, not a config.")
            node = child
        node[leaf] = value
    return result


def build_config(config: Mapping[str, Any]) -> Any:
    """The ``transformers`` config object for a config dict (its ``model_type`` picks the class)."""
    from transformers import CONFIG_MAPPING  # loaded on use: keeps start-up light

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ModelSourceError(
            f"model_type {model_type!r} is not known to this transformers version (remote-code models are not "
            f"run by meshplan).{did_you_mean(str(model_type), CONFIG_MAPPING.keys())}"
        )
    try:
        return CONFIG_MAPPING[model_type].from_dict(dict(config))
    except (TypeError, ValueError) as exc:
        raise ModelSourceError(f"Invalid {model_type} config: {exc}") from exc


def model_class(config_dict: Mapping[str, Any], config: Any) -> type[nn.Module]:
    """The class a training job would build: the config's ``architectures[0]``, else the causal-LM class."""
    # loaded on use: keeps start-up light
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

    for name in config_dict.get("architectures") or ():
        cls = getattr(transformers, name, None)
        if isinstance(cls, type):
            return cls
        raise ModelSourceError(
            f"Architecture {name!r} is not a transformers class (remote-code models are not run by meshplan); "
            "override it, e.g. --set 'architectures=[\"LlamaForCausalLM\"]'."
        )
    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText, AutoModel):
        mapping = auto._model_mapping
        if type(config) in mapping:
            return mapping[type(config)]
    raise ModelSourceError(f"No transformers model class for model_type {config.model_type!r}.")


def build_model(
    source: ModelSource, overrides: Mapping[str, Any] | None = None, device: str | torch.device = "meta",
    dtype: torch.dtype = torch.float32, seed: int | None = None,
) -> nn.Module:
    """Build the model of ``source`` (with ``overrides``) on ``device``: random weights, or none on ``meta``.

    With ``seed``, the random initialization is the same in every process that uses the same seed.
    """
    config_dict = apply_overrides(source.config, overrides or {})
    config = build_config(config_dict)
    cls = model_class(config_dict, config)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        return cls._from_config(config, dtype=dtype)
