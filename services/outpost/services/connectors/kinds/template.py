"""``{field}`` templates filled from a request's args (a routing key, a recipient, a subject).

Only plain field names: ``{shelf}``, never ``{shelf.__class__}`` or ``{items[0]}``, so a template
in the site file cannot reach past the values the request carries. A template is checked when the
connector is declared (:func:`check`), and a request whose args lack a field it names gets a final
failure naming the field, not a guess.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

_FORMATTER = string.Formatter()


class MissingFieldError(Exception):
    """The args lack a field the template names (a final failure: trying again will not add it)."""


def fields(template: str) -> list[str]:
    """The fields ``template`` names; ValueError for anything but ``{name}`` (and ``{{``/``}}``)."""
    names: list[str] = []
    for _literal, name, spec, conversion in _FORMATTER.parse(template):
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(f"only {{field}} placeholders are allowed, not {{{name}...}}")
        names.append(name)
    return names


def check(template: str) -> str:
    """A pydantic validator: ``template`` as it is, once it names fields plainly."""
    fields(template)
    return template


def fill(template: str, args: Mapping[str, Any]) -> str:
    """``template`` with each ``{field}`` replaced by ``str(args[field])``."""
    out: list[str] = []
    for literal, name, _spec, _conversion in _FORMATTER.parse(template):
        out.append(literal)
        if name is not None:
            if name not in args:
                raise MissingFieldError(name)
            out.append(str(args[name]))
    return "".join(out)
