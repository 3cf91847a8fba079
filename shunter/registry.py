"""A tiny registry of named implementations: dispatch policies, latency models, catalogs.

    DISPATCH = Registry("dispatch policy")

    @DISPATCH.register("round-robin")
    def round_robin(reports, request, ctx): ...

    DISPATCH.get("round-robin")      # the function
    DISPATCH.get("nope")             # ValueError: unknown dispatch policy 'nope'; choose from: round-robin, ...
    DISPATCH.names()                 # ['round-robin', ...] in registration order

Adding a policy is one function and one decorator line; the CLI lists the names
from the registry, so nothing else changes.
"""

from __future__ import annotations

from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Names to objects, in registration order; lookups fail with a one-line ValueError."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None):
        """Register `obj` under `name`; without `obj`, return a decorator that does.

        Names are lower-case and hyphenated (``least-load``, ``a100-80gb``); a
        name registered twice is a programming error.
        """
        if not name or name != name.lower() or " " in name or "_" in name:
            raise ValueError(f"{self.kind} name {name!r} must be lower-case and hyphenated")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")

        def add(entry: T) -> T:
            self._entries[name] = entry
            return entry

        if obj is not None:
            return add(obj)
        return add

    def get(self, name: str) -> T:
        """The entry named `name`; ValueError listing the valid names otherwise."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown {self.kind} {name!r}; choose from: {', '.join(self._entries)}") from None

    def names(self) -> list[str]:
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"

