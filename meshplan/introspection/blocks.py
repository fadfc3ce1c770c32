"""Find a model's repeated blocks structurally (no assumption that they live at ``model.model.layers``)."""

from __future__ import annotations

from torch import nn

#: Class-name endings of a block in a hybrid stack that mixes block classes (OLMo-Hybrid's attention and
#: linear-attention decoder layers, Zamba2's Mamba and hybrid layers, Mllama's self- and cross-attention layers).
BLOCK_CLASS_SUFFIXES = ("Layer", "Block")


def _is_block_container(module: nn.Module) -> bool:
    """A ModuleList/Sequential of one or more children that themselves have submodules, all of one class or, in a
    hybrid stack, all of classes named like blocks (:data:`BLOCK_CLASS_SUFFIXES`)."""
    if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
        return False
    if not all(any(True for _ in child.children()) for child in module):
        return False
    classes = {type(child) for child in module}
    return len(classes) == 1 or all(cls.__name__.endswith(BLOCK_CLASS_SUFFIXES) for cls in classes)


def find_block_containers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(fqn, container)`` for every outermost repeated-block container, in module order.

    Finds HF decoder stacks (``model.layers``), VLM towers (``language_model.layers``,
    ``vision_tower...layers``) and plain ``nn.ModuleList`` / ``nn.Sequential`` stacks. The search does
    not descend into a found container, so e.g. MoE expert lists inside a block are not returned.
    """
    found: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            fqn = f"{prefix}.{name}" if prefix else name
            if _is_block_container(child):
                found.append((fqn, child))
            else:
                visit(fqn, child)

    if _is_block_container(model):
        return [("", model)]
    visit("", model)
    return found


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(fqn, block)`` for every block of every container found by :func:`find_block_containers`."""
    return [
        (f"{fqn}.{name}" if fqn else name, block)
        for fqn, container in find_block_containers(model)
        for name, block in container.named_children()
    ]


#: Names of the MLP child of a decoder block (``mlp``: most decoders; ``feed_forward``: Llama4, Mixtral-style
#: and others; ``ffn``).
MLP_NAMES = ("mlp", "feed_forward", "ffn")


def mlp_name(block: nn.Module) -> str | None:
    """The name of ``block``'s MLP child (the first of :data:`MLP_NAMES` it has as a module), else ``None``."""
    return next((name for name in MLP_NAMES if isinstance(getattr(block, name, None), nn.Module)), None)
