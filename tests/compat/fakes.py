"""Stand-ins for the compat tests: a device mesh that only answers named lookups, FSDP2 unit doubles."""

from __future__ import annotations


class FakeSubMesh:
    def __init__(self, size: int) -> None:
        self._size = size
        self.ndim = 1

    def size(self) -> int:
        return self._size


class FakeMesh:
    """A ``DeviceMesh`` stand-in for code that only does ``mesh[name].size()`` (the reference's nvFSDP steps)."""

    device_type = "cuda"

    def __init__(self, **sizes: int) -> None:
        self.subs = {name: FakeSubMesh(size) for name, size in sizes.items()}

    def __getitem__(self, name: str) -> FakeSubMesh:
        return self.subs[name]


class UnitDouble:
    """Records ``unshard`` / ``reshard`` calls in order."""

    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    def unshard(self) -> None:
        self.log.append(f"unshard {self.name}")

    def reshard(self) -> None:
        self.log.append(f"reshard {self.name}")
