"""`oe config check` looks at the files a valid config names (oe_router/filecheck.py):
trust anchors and the identity key. A missing or unusable file that leaves the DNS front
off or keeps the daemon from starting is a problem (exit 1) naming the option, the file
and the line; what the daemon makes itself (the identity key) is a notice (exit 0)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from oe_router import cli
from oe_router.dns import autotrust

ANCHOR = ". 3600 IN DS 20326 8 2 E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D\n"


def check(
    tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]
) -> tuple[int, list[str], Path]:
    conf = tmp_path / "oe"
    conf.write_text(text)
    rc = cli.main(["config", "check", str(conf)])
    return rc, capsys.readouterr().out.splitlines(), conf


def dns(option: str, value: Path, *, named: bool = True) -> str:
    head = "config dns 'dns'" if named else "config dns"
    return f"config oe 'global'\n\n{head}\n\toption {option} '{value}'\n"


def identity(local_id: str, key: Path) -> str:
    return (
        "config oe 'global'\n\nconfig dns 'dns'\n\toption hold_limit '3s'\n\n"
        f"config identity 'identity'\n\toption local_id '{local_id}'\n"
        f"\toption private_key '{key}'\n"
    )


@pytest.fixture
def managed_anchors(tmp_path: Path) -> Path:
    """A managed anchor file where none exists on this host (not /etc/oe)."""
    return tmp_path / "etc-oe" / "root.anchors"


def test_a_missing_fixed_trust_anchor_is_a_problem_naming_option_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "root.key"
    rc, out, conf = check(tmp_path, dns("trust_anchor", missing), capsys)
    assert rc == 1
    assert out[0].startswith(f"{conf}:4: oe.dns.trust_anchor: {missing} does not exist: ")
    assert "the DNS front stays off" in out[0]
    assert out[1:] == [f"{conf}: 1 problem(s)"]
    # an anonymous section is named as libuci's tools name it
    rc, out, _ = check(tmp_path, dns("trust_anchor", missing, named=False), capsys)
    assert rc == 1 and f"{conf}:4: oe.@dns[0].trust_anchor: " in out[0]
    # a folder is not an anchor file either
    rc, out, _ = check(tmp_path, dns("trust_anchor", tmp_path), capsys)
    assert rc == 1 and f"{tmp_path} is not a file" in out[0]


def test_an_unusable_fixed_trust_anchor_is_a_problem_and_a_good_one_is_ok(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    anchor = tmp_path / "root.key"
    anchor.write_text("this is not a DS record\n")
    rc, out, conf = check(tmp_path, dns("trust_anchor", anchor), capsys)
    assert rc == 1
    assert out[0].startswith(f"{conf}:4: oe.dns.trust_anchor: trust anchor file {anchor}")
    assert out[0].endswith("the daemon does not start with it (the DNS front loads it)")
    anchor.write_text(ANCHOR)
    rc, out, _ = check(tmp_path, dns("trust_anchor", anchor), capsys)
    assert (rc, out) == (0, [f"{conf}: OK"])


def test_managed_anchors_missing_are_fine_with_the_shipped_seed_and_a_problem_without(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    managed_anchors: Path,
) -> None:
    assert autotrust.seed_exists()
    rc, out, conf = check(tmp_path, dns("auto_trust_anchor", managed_anchors), capsys)
    assert (rc, out) == (0, [f"{conf}: OK"])  # every router before its first start
    monkeypatch.setattr(autotrust, "seed_exists", lambda: False)
    rc, out, _ = check(tmp_path, dns("auto_trust_anchor", managed_anchors), capsys)
    assert rc == 1
    assert out[0].startswith(
        f"{conf}:4: oe.dns.auto_trust_anchor: {managed_anchors} does not exist and this"
        " oe-router ships no IANA root anchors"
    )
    # left at its default: named by its default section, without a line
    rc, out, _ = check(tmp_path, "config oe 'global'\n", capsys)
    default = Path("/etc/oe/root.anchors")
    if not default.exists():
        assert out[0].startswith(f"{conf}: oe.dns.auto_trust_anchor: {default} does not exist")


def test_a_corrupt_managed_anchor_file_is_a_notice_with_the_seed_a_problem_without(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    managed_anchors: Path,
) -> None:
    managed_anchors.parent.mkdir()
    managed_anchors.write_text("; nothing but a comment\n")
    rc, out, conf = check(tmp_path, dns("auto_trust_anchor", managed_anchors), capsys)
    assert rc == 0
    assert out[0].startswith(f"{conf}:4: oe.dns.auto_trust_anchor: notice: cannot be used (")
    assert "holds no DS or DNSKEY record" in out[0] and "shipped with oe-router" in out[0]
    assert out[1] == f"{conf}: OK (1 notice(s))"
    monkeypatch.setattr(autotrust, "seed_exists", lambda: False)
    rc, out, _ = check(tmp_path, dns("auto_trust_anchor", managed_anchors), capsys)
    assert rc == 1 and "the DNS front stays off" in out[0] and "notice" not in out[0]
    managed_anchors.write_text(ANCHOR)  # a plain DS file is a valid seed
    rc, out, _ = check(tmp_path, dns("auto_trust_anchor", managed_anchors), capsys)
    assert (rc, out) == (0, [f"{conf}: OK"])


def test_a_missing_identity_key_is_a_notice_the_daemon_makes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "etc" / "oe" / "private.pem"  # folders missing too: they are made
    rc, out, conf = check(tmp_path, identity("@router.example.org", key), capsys)
    assert rc == 0
    assert out == [
        f"{conf}:8: oe.identity.private_key: notice: {key} does not exist yet: the daemon"
        " makes one at start (ECDSA P-256, mode 0600) and logs the IPSECKEY record to"
        " publish for @router.example.org",
        f"{conf}: OK (1 notice(s))",
    ]
    assert not key.exists(), "the check only looks"
    # an IP identity needs one as well; %null needs none
    rc, out, _ = check(tmp_path, identity("192.0.2.1", key), capsys)
    assert rc == 0 and "notice" in out[0] and "for 192.0.2.1" in out[0]
    rc, out, _ = check(tmp_path, identity("%null", key), capsys)
    assert (rc, out) == (0, [f"{conf}: OK"])


def test_a_key_that_cannot_be_made_or_used_is_a_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    unmakeable = blocker / "private.pem"
    rc, out, conf = check(tmp_path, identity("@router.example.org", unmakeable), capsys)
    assert rc == 1
    assert out[0] == (
        f"{conf}:8: oe.identity.private_key: {unmakeable} does not exist and cannot be made"
        f" ({blocker} is not a folder): local_id @router.example.org needs a key, so the"
        " daemon does not start"
    )
    garbage = tmp_path / "private.pem"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    for local_id in ("@router.example.org", "%null"):
        rc, out, _ = check(tmp_path, identity(local_id, garbage), capsys)
        assert rc == 1, local_id
        assert out[0].startswith(
            f"{conf}:8: oe.identity.private_key: {garbage}: not a usable PEM private key"
        )
        assert "the daemon does not start" in out[0]
    pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
    )
    garbage.write_bytes(pem)
    rc, out, _ = check(tmp_path, identity("@router.example.org", garbage), capsys)
    assert (rc, out) == (0, [f"{conf}: OK"])


def test_files_are_looked_at_only_once_the_file_itself_is_valid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = dns("trust_anchor", tmp_path / "missing.key") + "\toption hold_limit 'forever'\n"
    rc, out, conf = check(tmp_path, text, capsys)
    assert rc == 1
    assert len(out) == 2 and "oe.dns.hold_limit" in out[0] and "trust_anchor" not in out[0]
    assert out[1] == f"{conf}: 1 problem(s)"
