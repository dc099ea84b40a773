"""The ``outpost`` command. Each group lives in its own module and is registered here."""

from __future__ import annotations

import sys

import typer

from outpost.cli import bench, config, log, memory, model, sim, stack
from outpost.errors import OutpostError

app = typer.Typer(
    name="outpost",
    help="Outpost: AI edge operating layer for IoT gateways.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
stack.register(app)
sim.register(app)
bench.register(app)
config.register(app)
model.register(app)
log.register(app)
memory.register(app)


def main() -> None:
    try:
        app()
    except OutpostError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        sys.exit(2)


if __name__ == "__main__":
    main()
