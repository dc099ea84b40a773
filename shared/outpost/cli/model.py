"""``outpost model``: the model registry (list, verify, activate, shadow, rollback, quantize).

The registry is the folder of model versions (``inference.models_dir``, by default the models
Outpost ships) plus the site's state in ``{data_dir}/sites/{site}/inference/registry.db``, found as
every command finds its site (:mod:`outpost.cli.site`); a running inference service picks up every
change within ``inference.reload_s`` and swaps between batches. Reading (list, verify) never
creates the state; a change (activate, shadow, rollback) says which site's registry it wrote."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from outpost.cli.output import JsonOpt, print_json, stdout_console
from outpost.cli.progress import Phases
from outpost.cli.site import DataDirOpt, SiteOpt, find_site, group_options
from outpost.errors import ConfigError, OutpostError

model_app = typer.Typer(
    help="Model registry: list, verify, activate, shadow, rollback, quantize.", no_args_is_help=True
)

NameArg = Annotated[str, typer.Argument(help="Model name, e.g. fridge-anomaly.")]
VersionArg = Annotated[str, typer.Argument(help="Version, e.g. 1.1.0.")]
model_app.callback()(group_options)


def _registry(
    data_dir: Path | None, site: str | None, *, write: bool = False, need_state: bool = True
) -> Any:
    """The site's registry. Without ``write`` a missing state is an error saying where it looked
    (``need_state``) or an empty one in memory (verify reads only the model files)."""
    from outpost.services.inference.registry import PACKAGED_MODELS, Registry

    w = find_site(data_dir, site)
    s = w.settings
    models_dir = s.inference.models_dir or PACKAGED_MODELS
    if not models_dir.is_dir():
        raise ConfigError(f"inference.models_dir {models_dir} is not a folder")
    from outpost.services.inference.loaded import check_loads

    state = w.site_path("inference", "registry.db")
    if not write and not state.is_file():
        if need_state:
            raise w.missing("model registry", state)
        state = Path(":memory:")
    if write:
        typer.echo(f"site {w.site!r}, registry {state}", err=True)
    return Registry(models_dir, state, check_load=check_loads)


def _known(reg: Any, name: str, version: str | None = None) -> None:
    if name not in reg.names():
        raise ConfigError(
            f"no model {name!r} in {reg.models_dir} (known: {', '.join(reg.names()) or 'none'})"
        )
    if version is not None and version not in reg.versions(name):
        raise ConfigError(f"no version {version!r} of {name} (known: {', '.join(reg.versions(name))})")


@model_app.command("list")
def list_models(json_out: JsonOpt = False, data_dir: DataDirOpt = None, site: SiteOpt = None) -> None:
    """Every model version in the site's registry, which is active, which shadows, which failed."""
    reg = _registry(data_dir, site)
    rows: list[dict[str, Any]] = []
    for name in reg.names():
        state = reg.state(name)
        bad = reg.bad_versions(name)
        for version in reg.versions(name):
            try:
                m = reg.manifest(name, version)
                desc, trigger = m.description, f"{m.trigger.metric} @ {m.trigger.device}"
            except OutpostError as exc:
                desc, trigger = f"(unreadable: {exc})", ""
            rows.append(
                {
                    "name": name,
                    "version": version,
                    "active": version == state.active,
                    "shadow": version == state.shadow,
                    "bad": bad.get(version),
                    "trigger": trigger,
                    "description": desc,
                }
            )
    if json_out:
        print_json({"models_dir": str(reg.models_dir), "models": rows})
        return
    t = Table(title=f"models in {reg.models_dir}")
    # at 80 columns the trigger and the description wrap; name, version and role never do
    for col in ("model", "version", "role", "trigger", "description"):
        fixed = col in ("model", "version", "role")
        t.add_column(
            col,
            overflow="ellipsis" if fixed else "fold",
            no_wrap=fixed,
            max_width=70 if col == "role" else None,
        )
    for r in rows:
        role = "active" if r["active"] else "shadow" if r["shadow"] else ""
        if r["bad"]:
            # chosen but failed to load: the service serves the last good version meanwhile
            role = (f"{role}, " if role else "") + f"FAILED: {r['bad'][:60]}"
        t.add_row(r["name"], r["version"], role, r["trigger"], r["description"].split(":")[0][:60])
    stdout_console().print(t)


@model_app.command("verify")
def verify(
    name: Annotated[str | None, typer.Argument(help="Model name (default: every model).")] = None,
    version: Annotated[str | None, typer.Argument(help="Version (default: every version).")] = None,
    json_out: JsonOpt = False,
    data_dir: DataDirOpt = None,
    site: SiteOpt = None,
) -> None:
    """Check manifests and checksums, and load each version on ONNX Runtime (CPU) with a warm-up
    that checks its shapes against the manifest. Exit code 2 if any version fails."""
    from outpost.services.inference.backends.config import OrtConfig
    from outpost.services.inference.loaded import load_model

    reg = _registry(data_dir, site, need_state=False)
    names = [name] if name else reg.names()
    results: list[dict[str, Any]] = []
    for n in names:
        _known(reg, n, version)
        for v in [version] if version else reg.versions(n):
            try:
                lm = load_model(reg, n, v, OrtConfig(), engine_dir=Path("/nonexistent"), max_batch=32)
                lm.close()
                results.append(
                    {"model": n, "version": v, "ok": True, "detail": f"sha256 {lm.manifest.sha256[:12]}"}
                )
            except OutpostError as exc:
                results.append({"model": n, "version": v, "ok": False, "detail": str(exc)})
    failed = [r for r in results if not r["ok"]]
    if json_out:
        print_json({"ok": not failed, "results": results})
    else:
        for r in results:
            mark = "[green]ok[/]" if r["ok"] else "[red]FAILED[/]"
            stdout_console().print(f"{mark} {r['model']}@{r['version']}: {r['detail']}")
    if failed:
        raise typer.Exit(2)


@model_app.command("activate")
def activate(name: NameArg, version: VersionArg, data_dir: DataDirOpt = None, site: SiteOpt = None) -> None:
    """Make VERSION the active one (verified first; a corrupt file is refused)."""
    reg = _registry(data_dir, site, write=True)
    _known(reg, name, version)
    before = reg.state(name)
    reg.activate(name, version)
    note = " (it was the shadow: shadowing stopped)" if before.shadow == version else ""
    typer.echo(f"{name}: active {before.active} -> {version}{note}")


@model_app.command("shadow")
def shadow(
    name: NameArg,
    version: Annotated[str | None, typer.Argument(help="Candidate version (omit with --off).")] = None,
    off: Annotated[bool, typer.Option("--off", help="Stop shadowing.")] = False,
    data_dir: DataDirOpt = None,
    site: SiteOpt = None,
) -> None:
    """Score VERSION alongside the active one; agreement and latency go to the service's metrics."""
    reg = _registry(data_dir, site, write=True)
    if off == (version is not None):
        raise ConfigError("give a VERSION to shadow, or --off to stop shadowing")
    _known(reg, name, version)
    reg.set_shadow(name, version)
    typer.echo(f"{name}: shadow {version or 'off'}")


@model_app.command("rollback")
def rollback(name: NameArg, data_dir: DataDirOpt = None, site: SiteOpt = None) -> None:
    """Go back to the version active before the current one (skipping versions that failed)."""
    reg = _registry(data_dir, site, write=True)
    _known(reg, name)
    before = reg.state(name)
    after = reg.rollback(name)
    note = "; it was the shadow: shadowing stopped" if before.shadow == after else ""
    typer.echo(f"{name}: active {before.active} -> {after} (rollback{note})")


@model_app.command("quantize")
def quantize(
    name: NameArg,
    version: VersionArg,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing -int8 version.")
    ] = False,
    json_out: JsonOpt = False,
    data_dir: DataDirOpt = None,
    site: SiteOpt = None,
) -> None:
    """Make VERSION-int8 (dynamic INT8 weights) and report size, latency and held-out accuracy
    against the float model."""
    from outpost.services.inference.quantize import STEPS
    from outpost.services.inference.quantize import quantize as run_quantize

    reg = _registry(data_dir, site, need_state=False)
    _known(reg, name, version)
    with Phases("quantize", total=STEPS) as say:  # on stderr: --json's last line stays the figures
        report = run_quantize(reg, name, version, overwrite=overwrite, progress=say).as_dict()
        say.done()
    if json_out:
        print_json(report)
        return
    t = Table(title=f"{report['source']} -> {report['result']}")
    for col in ("", "float", "int8"):
        t.add_column(col, justify="right")
    t.add_row("file bytes", f"{report['float_bytes']:,}", f"{report['int8_bytes']:,}")
    for b in report["float_us_per_batch"]:
        t.add_row(
            f"us per call, batch {b}",
            str(report["float_us_per_batch"][b]),
            str(report["int8_us_per_batch"][b]),
        )
    t.add_row(
        f"accuracy ({report['held_out_rows']:,} held-out rows)",
        f"{report['float_accuracy']:.4f}",
        f"{report['int8_accuracy']:.4f}",
    )
    t.add_row("label agreement with float", "", f"{report['label_agreement']:.4f}")
    stdout_console().print(t)


def register(app: typer.Typer) -> None:
    app.add_typer(model_app, name="model")
