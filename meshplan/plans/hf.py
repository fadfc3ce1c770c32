"""The Hugging Face fallback TP plan provider (a built-in plugin).

Registered for ``transformers.modeling_utils.PreTrainedModel``, so the MRO walk reaches it only when no
provider is registered for a more specific class. The provider lives in
:mod:`meshplan.plans.hf_translation` and is named by dotted path, so discovering this plugin imports
neither transformers nor DTensor.
"""

from __future__ import annotations

from ..plugins.hookspecs import hookimpl


@hookimpl
def meshplan_register_tp_plans(register) -> None:  # noqa: ANN001 - the hook's callback
    register("transformers.modeling_utils.PreTrainedModel", "meshplan.plans.hf_translation:hf_plans")
