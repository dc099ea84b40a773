"""outpost.access without a broker: the table of principals -> the password file, the ACL file and
the credentials folder (tests/integration/test_security.py runs them in Mosquitto)."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from outpost.access import (
    CLOUD_USER,
    OPERATOR,
    SERVICE_TOPICS,
    CloudBroker,
    SiteAccess,
    acl_text,
    asks_passwords,
    bridge_user,
    cloud_principals,
    hash_password,
    passwd_text,
    rules_markdown,
    service_user,
    site_principals,
)
from outpost.broker import uplink_bridge
from outpost.errors import TopicError
from outpost.services.registry import OutpostSettings
from outpost.settings import BrokerSettings, UplinkSettings
from outpost.topics import Topics

T = Topics(site="shop1")


def test_hash_is_mosquitto_passwd_s() -> None:
    """The line ``mosquitto_passwd -b`` (Mosquitto 2.0.11) wrote for alice/secret, rebuilt from its salt."""
    written = (
        "$7$101$9QN06aSgmaDICnVv$DDO90BDw8QQ257xRyRPG/1ajZnunZWq4fvhcsAkRValNvnLo3VkKZ4afn3RaO2QEPj/"
        "xCFw/OPj/v85RJ8Cl3w=="
    )
    assert hash_password("secret", base64.b64decode("9QN06aSgmaDICnVv")) == written
    assert hash_password("secret") != hash_password("secret")  # a fresh salt each time


def test_password_file_holds_hashes_only() -> None:
    text = passwd_text({"dev-a": "pw-of-a", OPERATOR: "pw-of-cli"})
    assert [line.split(":", 1)[0] for line in text.splitlines()] == ["dev-a", OPERATOR]
    assert "pw-of-a" not in text and "pw-of-cli" not in text
    with pytest.raises(ValueError, match="':'"):
        passwd_text({"a:b": "x"})


def test_every_service_of_the_registry_has_its_rules() -> None:
    assert set(OutpostSettings.SERVICES) <= set(SERVICE_TOPICS)


def test_acl_confines_every_principal_to_the_site() -> None:
    principals = site_principals(T, OutpostSettings.SERVICES, ["dev-a"])
    text = acl_text(principals)
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines[0].startswith("user "), "a rule before the first user line is the anonymous user's"
    assert not any(line.startswith("pattern") for line in lines)
    for p in principals:
        for r in p.rules:
            assert r.topic.startswith(T.root + "/") or r.topic == T.uplink_state(), (p.user, r.topic)
    device = next(p for p in principals if p.user == "dev-a")
    assert {(r.access, r.topic) for r in device.rules} == {
        ("write", T.telemetry("dev-a")),
        ("write", T.device_status("dev-a")),
        ("read", f"{T.root}/dev/dev-a/cmd/#"),
    }
    # only the connectors write device commands; only ingest reads telemetry; the operator neither
    cmd_writers = {
        p.user for p in principals if any(r.topic.endswith("/cmd/#") and r.access != "read" for r in p.rules)
    }
    assert cmd_writers == {service_user("connectors")}
    readers = {p.user for p in principals if any(r.topic == f"{T.root}/dev/#" for r in p.rules)}
    assert readers == {service_user("ingest")}


def test_an_unknown_service_gets_only_what_every_service_does() -> None:
    (p,) = site_principals(T, ["newsvc"], [])[:1]
    assert {r.topic.removeprefix(T.root + "/") for r in p.rules} == {
        "metrics/newsvc",
        "svc/newsvc/status",
        "dlq/newsvc",
        "control/newsvc/desired",
        "control/newsvc/reported",
    }


def test_a_device_cannot_take_a_service_name() -> None:
    with pytest.raises(TopicError):
        site_principals(T, [], [service_user("ingest")])


def test_site_credentials(tmp_path: Path) -> None:
    access = SiteAccess.of(tmp_path / "site", T)
    assert not access.exists
    passwords = access.passwords(["ingest"])
    assert set(passwords) == {service_user("ingest"), OPERATOR}
    assert access.exists and access.passwords(["ingest"]) == passwords  # kept, not made anew
    assert stat.S_IMODE(access.folder.stat().st_mode) == 0o700
    for path in [access.folder / "site.key", *(access.folder / "credentials").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert access.enroll(["dev-a", "dev-b", "dev-a"]) == ["dev-a", "dev-b"]
    assert access.enroll(["dev-b", "dev-c"]) == ["dev-c"]
    assert access.devices() == ["dev-a", "dev-b", "dev-c"]
    assert access.services() == ["ingest"]
    # derived: the same for the same device and key, never stored, different per device and site
    a = access.device_password("dev-a")
    assert (
        a == SiteAccess.of(tmp_path / "site", T).device_password("dev-a") != access.device_password("dev-b")
    )
    assert a != SiteAccess.of(tmp_path / "other", T).device_password("dev-a")
    assert a not in "".join(p.read_text() for p in access.folder.rglob("*") if p.is_file())
    assert access.passwords(["ingest"])["dev-c"] == access.device_password("dev-c")
    with pytest.raises(TopicError):
        access.enroll(["a/b"])


def test_cloud_broker_confines_each_site(tmp_path: Path) -> None:
    principals = {p.user: p for p in cloud_principals("outpost", ["s1", "s2"])}
    assert {(r.access, r.topic) for r in principals[bridge_user("s1")].rules} == {
        ("write", "outpost/v1/s1/up/#"),
        ("read", "outpost/v1/s1/down/#"),
    }
    assert {(r.access, r.topic) for r in principals[CLOUD_USER].rules} == {
        ("read", "outpost/v1/+/up/#"),
        ("write", "outpost/v1/+/down/#"),
    }
    broker = CloudBroker(tmp_path / "cloud", "outpost", ("s1",), port=8883)
    conf = broker.write().read_text()
    assert "allow_anonymous false" in conf and "listener 8883 0.0.0.0" in conf and "certfile" not in conf
    first = broker.credentials(bridge_user("s1")).read_text()
    # a second run for a bigger fleet keeps the passwords already handed out
    CloudBroker(tmp_path / "cloud", "outpost", ("s1", "s2")).write()
    assert broker.credentials(bridge_user("s1")).read_text() == first
    assert "user bridge.s2" in (tmp_path / "cloud" / "acl").read_text()
    assert first.strip() not in (tmp_path / "cloud" / "passwd").read_text()


def test_the_rules_in_docs_security_are_current() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    start = "<!-- rules: generated by outpost.access.rules_markdown (tests/unit/test_access.py) -->\n"
    table = text[text.index(start) + len(start) : text.index("<!-- /rules -->")]
    assert table == rules_markdown(), "paste outpost.access.rules_markdown() into docs/security.md"


def test_tls_settings_and_the_bridge_lines() -> None:
    with pytest.raises(ValidationError, match="tls_port needs tls_cert and tls_key"):
        BrokerSettings(tls_port=8883)
    with pytest.raises(ValidationError, match="require_certificate needs tls_ca"):
        BrokerSettings(tls_port=8883, tls_cert=Path("c"), tls_key=Path("k"), require_certificate=True)
    with pytest.raises(ValidationError, match="go together"):
        UplinkSettings(cloud="cloud:8883", ca=Path("ca"), cert=Path("c"))
    with pytest.raises(ValidationError, match="printable"):
        UplinkSettings(cloud="cloud:8883", ca=Path("a file\nconnection evil"))
    plain = uplink_bridge(T, UplinkSettings(cloud="cloud:1883"))
    assert not any(line.startswith("bridge_") for line in plain if line != "bridge_protocol_version mqttv311")
    tls = uplink_bridge(
        T,
        UplinkSettings(cloud="cloud:8883", ca=Path("/c/ca.pem"), cert=Path("/c/s.pem"), key=Path("/c/s.key")),
    )
    assert {
        "bridge_cafile /c/ca.pem",
        "bridge_certfile /c/s.pem",
        "bridge_keyfile /c/s.key",
        "bridge_insecure false",
    } <= set(tls)


def test_commands_use_the_credentials_only_for_the_sites_own_broker_with_auth(tmp_path: Path) -> None:
    conf = tmp_path / "mosquitto.conf"
    assert not asks_passwords(tmp_path, "127.0.0.1:1883")  # no broker of outpost up's there
    conf.write_text("listener 41234 127.0.0.1\nallow_anonymous true\n")
    assert not asks_passwords(tmp_path, "127.0.0.1:41234")  # auth off
    conf.write_text("listener 41234 127.0.0.1\nallow_anonymous false\npassword_file /x/passwd\n")
    assert asks_passwords(tmp_path, "127.0.0.1:41234")
    assert not asks_passwords(tmp_path, "10.0.0.5:1883")  # outpost up --broker: someone else's
