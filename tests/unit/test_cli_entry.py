"""The ``outpost`` entry point starts the zygote early for the commands that start the services
(outpost.cli.entry), which it tells from the arguments without parsing them with the CLI."""

from __future__ import annotations

import pytest

from outpost.cli.entry import STARTS_SERVICES, command


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["up"], "up"),
        (["up", "--broker", "127.0.0.1:1883"], "up"),
        (["--data-dir", "/srv/outpost", "up"], "up"),
        (["--site", "up", "status"], "status"),  # a site named "up" is not the command
        (["--site=shop12", "demo", "--duration", "5"], "demo"),
        (["status", "up"], "status"),
        (["--help"], None),
        ([], None),
    ],
)
def test_the_command_is_the_first_argument_that_is_no_option_or_its_value(
    args: list[str], expected: str | None
) -> None:
    assert command(args) == expected


def test_only_the_commands_that_start_services_start_the_zygote() -> None:
    assert set(STARTS_SERVICES) == {"up", "demo"}
