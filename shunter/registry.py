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
        self._aliases: dict[str, str] = {}

    def register(self, name: str, obj: T | None = None):
        """Register `obj` under `name`; without `obj`, return a decorator that does.

        Names are lower-case and hyphenated (``least-load``, ``a100-80gb``); a
        name registered twice is a programming error.
        """
        if not name or name != name.lower() or " " in name or "_" in name:
            raise ValueError(f"{self.kind} name {name!r} must be lower-case and hyphenated")
        if name in self._entries or name in self._aliases:
            raise ValueError(f"{self.kind} {name!r} is already registered")

        def add(entry: T) -> T:
            self._entries[name] = entry
            return entry

        if obj is not None:
            return add(obj)
        return add

    def alias(self, alias: str, name: str) -> None:
        """Make `alias` another name of the registered `name` (`rr` for `round-robin`)."""
        self.get(name)
        if alias in self._entries or alias in self._aliases:
            raise ValueError(f"{self.kind} {alias!r} is already registered")
        self._aliases[alias] = name

    def canonical(self, name: str) -> str:
        """The registered name that `name` (a name or an alias) stands for; ValueError if neither."""
        name = self._aliases.get(name, name) if isinstance(name, str) else name
        self.get(name)
        return name

    def get(self, name: str) -> T:
        """The entry named `name` (or aliased so); ValueError listing the valid names otherwise."""
        try:
            return self._entries[self._aliases.get(name, name)]
        except (KeyError, TypeError):
            raise ValueError(f"unknown {self.kind} {name!r}; choose from: {', '.join(self.listing())}") from None

    def listing(self) -> list[str]:
        """Registered names in order, each followed by its aliases in parentheses."""
        return [name + "".join(f" ({a})" for a, n in self._aliases.items() if n == name) for name in self._entries]

    def names(self) -> list[str]:
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"

