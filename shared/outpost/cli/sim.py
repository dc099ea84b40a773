"""``outpost sim``: run the device simulator against a broker and report what was sent.

Defaults for the broker, site, prefix and credentials come from Outpost's settings (site file and
``OUTPOST_*`` variables, ``OUTPOST_MQTT__PASSWORD`` included) and from the run file of the
``outpost up`` that owns the data folder (:mod:`outpost.cli.site`), so the simulator aims where the
services listen unless told otherwise. The password is never printed: it is not echoed in help,
errors or the report.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterator
from enum import StrEnum
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import SecretStr, ValidationError
from rich.console import Console

from outpost.access import OPERATOR
from outpost.broker import check_broker
from outpost.cli.output import JsonOpt
from outpost.cli.site import DataDirOpt, SiteOpt, Where, find_site
from outpost.errors import BrokerError, ConfigError
from outpost.settings import MqttSettings

if TYPE_CHECKING:
    from outpost.sim import SimOptions


class ScenarioName(StrEnum):
    retail = "retail"
    generic = "generic"


def _options_error(exc: ValidationError) -> ConfigError:
    lines = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "(options)"
        lines.append(f"  --{loc.replace('_', '-')}: {err['msg']}")
    return ConfigError("invalid simulator options:\n" + "\n".join(lines))


def sim(
    broker: Annotated[
        str | None,
        typer.Option(help="Broker as HOST:PORT (default: the mqtt settings, then the running site's)."),
    ] = None,
    site: SiteOpt = None,
    prefix: Annotated[
        str | None, typer.Option(help="Topic prefix (default: the prefix setting, outpost).")
    ] = None,
    devices: Annotated[int, typer.Option(min=1, help="Number of simulated devices.")] = 50,
    scenario: Annotated[
        ScenarioName,
        typer.Option(
            help="retail: a small shop (shelves, fridges, doors, tills); generic: one of each sensor."
        ),
    ] = ScenarioName.retail,
    rate: Annotated[
        float,
        typer.Option(
            min=0, help="Items (readings and bad payloads) offered per second in total; 0 = flat out."
        ),
    ] = 1000.0,
    duration: Annotated[float, typer.Option(min=0.001, help="Seconds to run.")] = 10.0,
    readings: Annotated[
        int, typer.Option(min=0, help="Stop after this many items in total; 0 = no limit.")
    ] = 0,
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives each device the same readings.")] = 0,
    bad_ratio: Annotated[
        float, typer.Option(min=0, max=1, help="Fraction of items that are bad payloads.")
    ] = 0.0,
    bad_kinds: Annotated[
        str | None, typer.Option(help="Comma-separated bad kinds to draw from (default: all).")
    ] = None,
    batch: Annotated[
        int, typer.Option(min=1, help="Readings per message; 1 sends bare reading objects.")
    ] = 1,
    qos: Annotated[int, typer.Option(min=0, max=1, help="QoS of telemetry publishes.")] = 0,
    processes: Annotated[
        int | None, typer.Option(min=1, help="Publisher processes (default: CPU count).")
    ] = None,
    churn: Annotated[float, typer.Option(min=0, help="Abrupt disconnects per device per minute.")] = 1.0,
    anomaly_rate: Annotated[
        float, typer.Option(min=0, max=1, help="Chance per device step that an anomaly episode starts.")
    ] = 0.002,
    seq_start: Annotated[int, typer.Option(min=0, help="First seq of every device.")] = 0,
    username: Annotated[
        str | None, typer.Option(help="Broker user (default: the mqtt.username setting).")
    ] = None,
    password: Annotated[
        str | None,
        typer.Option(
            help="Broker password (default: OUTPOST_MQTT__PASSWORD / the mqtt.password setting).",
            show_default=False,
        ),
    ] = None,
    json_out: JsonOpt = False,
    data_dir: DataDirOpt = None,
) -> None:
    """Simulate a fleet of devices publishing telemetry (with bad input, anomalies and churn)."""
    from outpost.sim import SimOptions, run
    from outpost.sim.report import render

    where = find_site(data_dir, site, broker)
    settings = where.settings
    fields: dict[str, object] = {
        "broker": where.broker,
        "site": settings.site,
        "prefix": prefix or settings.prefix,
        "devices": devices,
        "scenario": scenario.value,
        "rate": rate,
        "duration": duration,
        "readings": readings,
        "seed": seed,
        "bad_ratio": bad_ratio,
        "batch": batch,
        "qos": qos,
        "churn": churn,
        "anomaly_rate": anomaly_rate,
        "seq_start": seq_start,
        "username": username if username is not None else settings.mqtt.username,
        "password": SecretStr(password) if password is not None else settings.mqtt.password,
    }
    if processes is not None:
        fields["processes"] = processes
    if bad_kinds:
        fields["bad_kinds"] = tuple(k.strip() for k in bad_kinds.split(",") if k.strip())
    access = where.access if username is None and settings.mqtt.username == OPERATOR else None
    if access is not None:  # the site's own broker: each device connects as itself
        fields |= {"username": None, "password": None, "credentials": access.folder}
    try:
        options = SimOptions.model_validate(fields)
    except ValidationError as exc:
        raise _options_error(exc) from None
    if access is not None:
        _enroll(where, options)

    stop = threading.Event()
    with _stop_on_signals(stop):  # Ctrl-C / SIGTERM end the run early; the report still comes
        if json_out:
            report = run(options, stop=stop)
        else:
            with Console(stderr=True).status(
                f"simulating {options.devices} {options.scenario} devices on {options.broker} "
                f"for up to {options.duration:g}s (Ctrl-C stops)"
            ):
                report = run(options, stop=stop)
    if json_out:
        sys.stdout.write(report.model_dump_json() + "\n")
        sys.stdout.flush()
    else:
        render(report, Console())


def _enroll(where: Where, options: SimOptions) -> None:
    """Enroll the simulated devices on the site's broker (each then connects as itself, with the
    password derived from the site key) and wait until the broker has reread its files."""
    from outpost.sim.scenario import fleet_specs

    assert where.access is not None
    ids = [spec.id for spec in fleet_specs(options.devices, options.scenario)]
    folder, watched = where.broker_files()
    if not where.access.enroll_and_reload(folder, ids, watched=watched):
        return
    device = MqttSettings(
        host=options.host,
        port=options.port,
        username=ids[-1],
        password=SecretStr(where.access.device_password(ids[-1])),
    )
    deadline = time.monotonic() + 10
    while True:  # Mosquitto rereads its files on SIGHUP in its main loop, soon after (compose's
        # broker container sends it within a second or two of the files' change)
        try:
            check_broker(device, timeout_s=2)
            return
        except BrokerError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT/SIGTERM set ``stop`` while the run lasts; the previous handlers come back after (the
    command may run inside another program, a test runner say, that has its own)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def register(app: typer.Typer) -> None:
    """Add ``outpost sim`` to the root app."""
    app.command("sim")(sim)
