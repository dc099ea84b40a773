"""The ``outpost`` command's entry point (``[project.scripts]``).

For the commands that start the services (``outpost up``, ``outpost demo``) the zygote, which
imports every service before forking them (docs/operations.md, "The zygote"), is started first,
before this command imports the rest of itself: each takes about a second and a half, and on a
gateway's cores the two overlap, which is most of a stack's cold start. Every other command goes
straight to :func:`outpost.cli.main.main`.
"""

from __future__ import annotations

import sys

STARTS_SERVICES = ("up", "demo")
VALUED_ROOT_OPTIONS = ("--data-dir", "--site")
"""The root options that take a value, which is not the command (``outpost --site up up``)."""
PRELOAD = "@outpost.services.registry:OutpostSettings.PRELOAD"
"""What the zygote imports: every service's module, named without importing the registry here."""


def command(args: list[str]) -> str | None:
    """The subcommand in ``outpost``'s arguments: the first that is neither an option nor a root
    option's value."""
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in VALUED_ROOT_OPTIONS:
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


def main() -> None:
    if command(sys.argv[1:]) in STARTS_SERVICES:
        from outpost.supervisor import start_zygote_early

        start_zygote_early([PRELOAD])
    from outpost.cli.main import main as run

    run()


if __name__ == "__main__":
    main()
