"""MkDocs hook: the configuration reference, generated from the pydantic models of bilevel_dlm.config.

``<!-- config-reference -->`` in a page is replaced by one table per config model (field, type, default,
meaning); tests/test_docs.py checks that the tables list every field of every model.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel

from bilevel_dlm import config as config_module

MARKER = "<!-- config-reference -->"


def _type_name(annotation: Any) -> str:
    """A short readable type: Literal values, unions with |, tuple[str, ...]."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(repr(value) for value in args)
    if annotation is type(None):
        return "None"
    if annotation is Ellipsis:
        return "..."
    if isinstance(annotation, type) and not args:
        return annotation.__name__
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if args:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    return str(annotation).replace("typing.", "")


def _default(value: Any) -> str:
    if isinstance(value, BaseModel):
        return f"`{type(value).__name__}()`"
    return f"`{value!r}`"


def config_reference() -> str:
    """Markdown: a section per config model with a row per field."""
    sections = []
    for name in config_module.__all__:
        model = getattr(config_module, name)
        rows = [f"## {name}", "", (model.__doc__ or "").strip(), "", "| field | type | default | meaning |",
                "|---|---|---|---|"]
        for field, info in model.model_fields.items():
            meaning = (info.description or "").replace("|", "\\|")
            rows.append(f"| `{field}` | {_type_name(info.annotation)} | {_default(info.default)} | {meaning} |")
        sections.append("\n".join(rows))
    return "\n\n".join(sections) + "\n"


def on_page_markdown(markdown: str, **_: Any) -> str:
    return markdown.replace(MARKER, config_reference()) if MARKER in markdown else markdown
