"""One registry class for every kind of part (encoders, connectors, language models, catalogue, ...).

A part registers under a name; configs name parts; looking up an unknown name raises an error that lists the
registered names and the closest match.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from zoo.errors import UserError

T = TypeVar("T")


class UnknownPartError(UserError, KeyError):
    """Raised when a config names a part that is not registered; the message lists the registered names."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class Registry(Generic[T]):
    """A name -> part mapping for one kind of part.

    >>> connectors = Registry("connector")
    >>> @connectors.register("mlp")
    ... class MLPConnector: ...
    >>> connectors.get("mlp") is MLPConnector
    True
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._parts: dict[str, T] = {}

    def register(self, name: str, part: T | None = None) -> Any:
        """Register `part` under `name`; without `part`, return a decorator."""

        def add(obj: T) -> T:
            if name in self._parts and self._parts[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered to {self._parts[name]!r}")
            self._parts[name] = obj
            return obj

        return add(part) if part is not None else add

    def get(self, name: str, field: str | None = None) -> T:
        """Return the part registered as `name`; `field` (a config path) is named in the error if unknown."""
        try:
            return self._parts[name]
        except KeyError:
            where = f"{field}: " if field else ""
            close = difflib.get_close_matches(str(name), self._parts, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            known = ", ".join(sorted(self._parts)) or "(none)"
            raise UnknownPartError(f"{where}unknown {self.kind} {name!r}{hint} Registered {self.kind}s: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._parts)

    def __contains__(self, name: object) -> bool:
        return name in self._parts

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._parts)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"

