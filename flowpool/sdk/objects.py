"""The SDK's answers: :class:`Obj`, attribute and item access over the API's JSON."""
from __future__ import annotations

from typing import Any

__all__ = ["Obj"]


class Obj:
    """Attribute and item access over JSON: ``obj.choices[0].message.content``; ``obj.to_dict()`` for the raw data.

    It prints as its kind and fields, ``ChatCompletion(id='chatcmpl-...', model='workflow:echo', ...)``:
    the kind is the answer's ``object`` (``chat.completion``), or what the
    client asked for (``Run``), or the key it was read under (``choices[0]``
    is a ``Choice``).
    """

    def __init__(self, data: dict[str, Any], kind: str | None = None) -> None:
        self._data = data
        self._kind = _kind_of(data) or kind or "Obj"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # never a field: copy and pickle look these up before _data is set
            raise AttributeError(name)
        try:
            return wrap(self._data[name], name)
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, name: str) -> Any:
        return wrap(self._data[name], name)

    def __contains__(self, name: object) -> bool:
        return name in self._data

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *(k for k in self._data if k.isidentifier())})

    def get(self, name: str, default: Any = None) -> Any:
        return wrap(self._data.get(name, default), name)

    def to_dict(self) -> dict[str, Any]:
        return self._data

    def __repr__(self) -> str:
        if all(isinstance(k, str) and k.isidentifier() for k in self._data):
            return f"{self._kind}({', '.join(f'{k}={v!r}' for k, v in self._data.items())})"
        return f"{self._kind}({self._data!r})"


def _kind_of(data: dict[str, Any]) -> str | None:
    """The class-style name of an answer's ``object`` field: ``chat.completion`` -> ``ChatCompletion``."""
    kind = data.get("object")
    if not isinstance(kind, str) or not kind:
        return None
    return "".join(part[:1].upper() + part[1:] for part in kind.replace("_", ".").split("."))


def _title(key: str) -> str:
    """``model_call`` -> ``ModelCall``."""
    return "".join(part[:1].upper() + part[1:] for part in key.split("_")) or "Obj"


def _singular(key: str) -> str:
    """What one item of a list under ``key`` is called: ``choices`` -> ``choice``, ``entries`` -> ``entry``."""
    if key.endswith("ies") and len(key) > 3:
        return key[:-3] + "y"
    return key[:-1] if key.endswith("s") and not key.endswith("ss") else key


def wrap(value: Any, key: str | None = None) -> Any:
    """JSON with its objects as :class:`Obj`, named after ``key`` (a list's items after its singular)."""
    if isinstance(value, dict):
        return Obj(value, _title(key) if key else None)
    if isinstance(value, list):
        item = _singular(key) if key else None
        return [wrap(v, item) for v in value]
    return value
