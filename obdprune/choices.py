"""String-valued options (method, scope, granularity, ...) parsed once at the boundary."""
from __future__ import annotations

import enum
from typing import TypeVar

from obdprune.errors import UsageError

C = TypeVar("C", bound="Choice")


class Choice(str, enum.Enum):
    """An option with a fixed set of string values; ``parse`` turns a typo into one line listing them.

    Error messages call the option by its lower-cased class name, or by the ``label`` given in the class
    statement::

        class OptimizerName(Choice, label="optimizer"):
            SGD = "sgd"
    """

    def __init_subclass__(cls, *, label: str | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls._option_label = label

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def label(cls) -> str:
        """What the option is called in error messages."""
        return cls._option_label or cls.__name__.lower()

    @classmethod
    def parse(cls: type[C], value: "str | C") -> C:
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            raise UsageError(f"unknown {cls.label()} {value!r}; choose one of: "
                             f"{', '.join(c.value for c in cls)}") from None
