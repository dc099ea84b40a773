"""The ``outpost`` command. Each group lives in its own module and is registered here."""

from __future__ import annotations

import inspect
import re
import sys

import typer
from typer.core import TyperOption
from typer.models import CommandInfo

from outpost.cli import (
    actions,
    agents,
    bench,
    broker,
    cloud,
    config,
    data,
    log,
    memory,
    model,
    secrets,
    sim,
    site,
    stack,
)
from outpost.errors import OutpostError

app = typer.Typer(
    name="outpost",
    help="Outpost: AI edge operating layer for IoT gateways.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.callback()(site.root_options)
stack.register(app)
sim.register(app)
bench.register(app)
config.register(app)
model.register(app)
log.register(app)
memory.register(app)
cloud.register(app)
broker.register(app)
data.register(app)
agents.register(app)
secrets.register(app)
actions.register(app)


def _reflow(text: str) -> str:
    """A docstring's paragraphs, each on one line: typer keeps a docstring's line breaks in the
    commands' list, which then broke mid-sentence."""
    return "\n\n".join(re.sub(r"\s*\n\s*", " ", p) for p in inspect.cleandoc(text).split("\n\n"))


def _reflow_help(t: typer.Typer) -> None:
    commands: list[CommandInfo] = list(t.registered_commands)
    for info in commands:
        doc = info.help or (inspect.getdoc(info.callback) if info.callback is not None else None)
        if doc:
            info.help = _reflow(doc)
    for group in t.registered_groups:
        if group.typer_instance is not None:
            _reflow_help(group.typer_instance)


def _flag_type(self: TyperOption, ctx: object) -> str | None:
    """A flag takes no value: its help shows none (typer 0.29 shows ``<bool>``, which reads as if
    ``--json true`` were the way to give it)."""
    if self.is_flag:
        return None
    return _typer_display_type(self, ctx)  # type: ignore[arg-type]


_typer_display_type = TyperOption.display_type_rich
TyperOption.display_type_rich = _flag_type  # type: ignore[method-assign]
_reflow_help(app)


def main() -> None:
    try:
        app()
    except OutpostError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        sys.exit(2)


if __name__ == "__main__":
    main()
