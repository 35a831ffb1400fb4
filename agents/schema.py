"""Declared types of a peer's inputs and outputs: what a caller must send, what it gets back.

A `TypeSpec` is data (a name, a JSON schema, an import path) so it can sit in a council's
declaration, be digested and sent to another process; the live type rides along in the
process that declared it. Validation uses pydantic (`TypeAdapter`) when the type is at
hand or importable, and the JSON schema otherwise, so a peer served elsewhere checks the
same shape. A validated value is turned back into JSON: that is what crosses the bus.
"""

from __future__ import annotations

import importlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, PrivateAttr, TypeAdapter, ValidationError

from channels.messages import Ref

__all__ = ["Mismatch", "TypeSpec", "signature"]


class Mismatch(ValueError):
    """A value that does not fit its declared type; `errors` lists each problem in words."""

    def __init__(self, what: str, errors: list[str]) -> None:
        self.errors = errors
        super().__init__(f"{what}: " + "; ".join(errors))


class TypeSpec(BaseModel):
    """A pydantic model, or any type a `TypeAdapter` accepts, as declaration data."""

    model_config = ConfigDict(frozen=True)

    name: str
    json_schema: dict[str, Any]
    path: str | None = None  # module:qualname of a class, to import it in another process

    _type: Any = PrivateAttr(default=None)
    _adapter: Any = PrivateAttr(default=None)

    @classmethod
    def of(cls, tp: Any) -> TypeSpec:
        if isinstance(tp, TypeSpec):
            return tp
        if isinstance(tp, dict):  # the JSON form, from another process
            return cls.model_validate(tp)
        try:
            adapter = TypeAdapter(tp)
            schema = adapter.json_schema()
        except Exception as e:
            raise TypeError(
                f"{tp!r} cannot be a declared type: pydantic cannot build a JSON schema for it "
                f"({e}); use a pydantic model or a type such as list[int] or dict[str, float]"
            ) from None
        spec = cls(name=_name(tp), json_schema=schema, path=_path(tp))
        spec._type, spec._adapter = tp, adapter
        return spec

    def __eq__(self, other: object) -> bool:  # data equality: the live type aside
        return isinstance(other, TypeSpec) and self.model_dump() == other.model_dump()

    def __hash__(self) -> int:
        return hash((self.name, self.path))

    # -- checking ----------------------------------------------------------------------------

    def validate_json_value(self, value: Any, what: str = "the value") -> Any:
        """The value checked against the type and returned as JSON (defaults filled in,
        "3" read as 3 where the type says int); `Mismatch` when it does not fit."""
        adapter = self._pydantic()
        if adapter is not None:
            try:
                checked = adapter.validate_python(value)
            except ValidationError as e:
                raise Mismatch(what, _pydantic_errors(e)) from None
            return adapter.dump_python(checked, mode="json")
        return self._by_schema(value, what)

    def fits_ref(self, ref: Ref) -> bool | None:
        """Whether a stored value can fit without reading it: by its kind; None if that
        cannot tell (a JSON value must be read to be checked)."""
        kind = self.json_schema.get("type")
        if not self.json_schema:  # Any
            return True
        if ref.kind == "text":
            return kind == "string"
        if ref.kind == "bytes":
            return kind == "string" and self.json_schema.get("format") == "binary"
        return None

    def _pydantic(self) -> Any:
        if self._adapter is None and self._type is None and self.path:
            try:
                self._type = _resolve(self.path)
                self._adapter = TypeAdapter(self._type)
            except Exception:
                self._type = self._adapter = None
        if self._adapter is None and self._type is not None:
            self._adapter = TypeAdapter(self._type)
        return self._adapter

    def _by_schema(self, value: Any, what: str) -> Any:
        try:
            import jsonschema
        except ImportError:  # pragma: no cover - litellm depends on it
            raise Mismatch(
                what,
                [f"{self.name} is not importable here and jsonschema is not installed"],
            ) from None
        validator = jsonschema.Draft202012Validator(self.json_schema)
        errors = [
            ".".join(str(p) for p in e.absolute_path) + ": " * bool(e.absolute_path) + e.message
            for e in validator.iter_errors(value)
        ]
        if errors:
            raise Mismatch(what, errors[:10])
        return value

    # -- showing ----------------------------------------------------------------------------

    def describe(self) -> str:
        """The type as a caller's model reads it: its name and its JSON schema."""
        if set(self.json_schema) <= {"type"}:  # str, int, ...: the name says it all
            return self.name
        schema = json.dumps(self.json_schema, separators=(",", ":"), sort_keys=True)
        return f"{self.name} (JSON schema: {schema})"

    def response_format(self) -> dict[str, Any]:
        """OpenAI's structured-output request for this type (litellm passes it on).

        The provider requires an object at the top; any other type is wrapped as the
        single field `value` and unwrapped again by `unwrap`.
        """
        return {
            "type": "json_schema",
            "json_schema": {
                "name": _schema_name(self.name),
                "schema": self._object_schema(),
            },
        }

    def _object_schema(self) -> dict[str, Any]:
        if self.json_schema.get("type") == "object":
            return self.json_schema
        return {"type": "object", "properties": {"value": self.json_schema}, "required": ["value"]}

    def unwrap(self, data: Any) -> Any:
        """A structured reply back to the declared shape (see `response_format`)."""
        if self.json_schema.get("type") != "object" and isinstance(data, dict) and "value" in data:
            return data["value"]
        return data


def signature(inputs: dict[str, TypeSpec], output: TypeSpec | None) -> str:
    """A peer's signature as callers' models read it, with its declared types."""
    context = (
        f"context: {inputs['context'].describe()} = None" if "context" in inputs else "context=None"
    )
    named = [f"{k}: {v.describe()}" for k, v in inputs.items() if k != "context"]
    params = ", ".join(["prompt: str", context, *named])
    result = output.describe() if output is not None else "Any"
    return f"({params}) -> {result}"


def _pydantic_errors(e: ValidationError) -> list[str]:
    out = []
    for err in e.errors()[:10]:
        where = ".".join(str(p) for p in err["loc"])
        out.append(f"{where}: {err['msg']}" if where else err["msg"])
    return out


def _name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return repr(tp).replace("typing.", "")


def _path(tp: Any) -> str | None:
    if not isinstance(tp, type):
        return None
    module, qualname = getattr(tp, "__module__", None), getattr(tp, "__qualname__", "")
    if not module or "<locals>" in qualname or module == "builtins":
        return None
    return f"{module}:{qualname}"


def _resolve(path: str) -> Any:
    module, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _schema_name(name: str) -> str:
    clean = "".join(c if c.isalnum() or c in "_-" else "_" for c in name)
    return clean[:64] or "output"
