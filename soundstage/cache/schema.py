"""The field schema: what a stage stores per clip (name, dtype, shape), as the cache records it."""

from __future__ import annotations

from dataclasses import dataclass

#: dtypes a field may have; "str" is variable-length UTF-8.
FIELD_DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool", "str")


@dataclass(frozen=True)
class Field:
    """One output field: dtype and per-clip shape.

    ``None`` in the first axis: the length varies per clip (ragged, e.g. frames). ``None`` in a
    later axis: a size known only at run time (e.g. the model's hidden size), the same for every
    clip of an output.
    """

    name: str
    dtype: str
    shape: tuple = ()
    help: str = ""

    def __post_init__(self):
        if self.dtype not in FIELD_DTYPES:
            raise ValueError(f"field {self.name}: unknown dtype {self.dtype!r}; use one of {FIELD_DTYPES}")

    @property
    def ragged(self) -> bool:
        return bool(self.shape) and self.shape[0] is None


def field_schema(fields: list[Field]) -> list[dict]:
    """Fields as JSON-able dicts (stored in stage.json and in every part's ``fields`` attribute)."""
    return [{"name": f.name, "dtype": f.dtype, "shape": list(f.shape), "help": f.help} for f in fields]


def fields_from_schema(schema: list[dict]) -> list[Field]:
    return [Field(d["name"], d["dtype"], tuple(d["shape"]), d.get("help", "")) for d in schema]
