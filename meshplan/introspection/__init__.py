"""What a model is made of, answered once for every axis: decoder blocks, attention modules, sequence mixers,
fused experts, embeddings and the text config.

Every answer is read off the module tree (and the config) by structure and naming convention, without importing
transformers, so that validation, plans, context parallelism, activation checkpointing, the dry run and the
compat layer agree on what "the attention" or "the experts" of a model are. Submodules:

* :mod:`~meshplan.introspection.blocks` — repeated decoder blocks and their MLPs;
* :mod:`~meshplan.introspection.config` — the model's config and its text config;
* :mod:`~meshplan.introspection.embeddings` — input / output embeddings and whether they are tied;
* :mod:`~meshplan.introspection.attention` — attention modules;
* :mod:`~meshplan.introspection.mixers` — sequence mixers other than attention (convolutions, state spaces,
  linear attention);
* :mod:`~meshplan.introspection.experts` — fused experts modules.

This package imports only torch and :mod:`meshplan.core`.
"""

from __future__ import annotations

from .attention import attention_modules, head_attention_modules
from .blocks import find_block_containers, find_blocks, mlp_name
from .config import model_configs, text_config
from .embeddings import are_tied, embedding_modules, module_name
from .experts import expert_count, find_expert_modules
from .mixers import SequenceMixer, sequence_mixers

__all__ = ["SequenceMixer", "are_tied", "attention_modules", "embedding_modules", "expert_count",
           "find_block_containers", "find_blocks", "find_expert_modules", "head_attention_modules", "mlp_name",
           "model_configs", "module_name", "sequence_mixers", "text_config"]
