"""What `oe config check` looks at beyond the file itself: the files its options name.

Why: a file can be valid and still leave the DNS trigger off (a fixed trust anchor that
is not there) or IKE without its key (a key file that is not a key). The daemon finds
out only at start, in a log line; `oe config check` says so beforehand, naming the
option. The daemon's own start is not changed by any of this.

Two kinds of finding:

* a *problem* keeps a feature, or the daemon, from working as configured (exit 1): a
  missing fixed ``trust_anchor`` (the DNS front stays off) or an unusable one (the
  daemon does not start); no managed anchor file and no IANA anchors shipped to start
  it from; a key file that is not a usable key, or a key the identity needs that
  cannot be made (the daemon does not start: IKE loads the key at start);
* a *notice* is something the daemon will take care of itself (exit 0): the identity
  key does not exist yet and the daemon makes it at start; the managed anchor file
  cannot be used and the daemon falls back to the shipped anchors; a file this user
  cannot read (the daemon runs as root). A managed anchor file that does not exist yet
  is no finding: that is every router before its first start.
"""

from __future__ import annotations

import os
import time
from dataclasses import field
from pathlib import Path

from oe_router.config import ConfigProblem, OeConfig
from oe_router.config.uci import UciPackage, UciSyntaxError, parse
from oe_router.config.validate import option_location
from oe_router.records import record

__all__ = ["FileFindings", "check_files"]


@record
class FileFindings:
    """Problems (the configuration will not work as written) and notices (it will, once
    the daemon has made what is missing)."""

    problems: list[ConfigProblem] = field(default_factory=list)
    notices: list[ConfigProblem] = field(default_factory=list)


class _Where:
    """Where an option is written in the file, for the findings' file:line and UCI path."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.pkg: UciPackage | None = parse(Path(path).read_text(encoding="utf-8"), path)
        except (OSError, UnicodeDecodeError, UciSyntaxError):
            self.pkg = None

    def finding(self, stype: str, name: str, value: str, message: str) -> ConfigProblem:
        pkg = self.pkg or UciPackage()
        option, line = option_location(pkg, stype, name)
        return ConfigProblem(self.path, line, option, value, message)


def _unreadable(path: Path) -> str | None:
    """Why this user cannot read ``path`` (None if it can)."""
    if os.access(path, os.R_OK):
        return None
    return "this user cannot read it (the daemon runs as root: check again as root)"


def check_files(config: OeConfig, path: str | os.PathLike[str]) -> FileFindings:
    """The findings about the files ``config`` (read from ``path``) names."""
    where = _Where(os.fspath(path))
    out = FileFindings()
    _trust_anchor(config, where, out)
    _identity_key(config, where, out)
    return out


def _trust_anchor(config: OeConfig, where: _Where, out: FileFindings) -> None:
    from oe_router.dns.anchors import AnchorStateError, TrustPoint
    from oe_router.dns.autotrust import seed_exists
    from oe_router.dns.dnssec import TrustAnchorError, load_trust_anchor_file

    dns = config.dns
    if dns.trust_anchor:
        fixed = Path(dns.trust_anchor)
        if not fixed.is_file():
            what = "is not a file" if fixed.exists() else "does not exist"
            out.problems.append(
                where.finding(
                    "dns",
                    "trust_anchor",
                    dns.trust_anchor,
                    f"{fixed} {what}: the DNS front stays off (no DNS-triggered tunnels); "
                    "put the root's DS or DNSKEY records there, or remove the option to use "
                    "the managed anchors of auto_trust_anchor",
                )
            )
            return
        if (why := _unreadable(fixed)) is not None:
            out.notices.append(where.finding("dns", "trust_anchor", dns.trust_anchor, why))
            return
        try:
            load_trust_anchor_file(fixed)
        except TrustAnchorError as exc:
            out.problems.append(
                where.finding(
                    "dns",
                    "trust_anchor",
                    dns.trust_anchor,
                    f"{exc}: the daemon does not start with it (the DNS front loads it)",
                )
            )
        return
    managed = Path(dns.auto_trust_anchor)
    shipped = seed_exists()
    if not managed.exists():
        # with the shipped anchors this is every router before its first start: nothing
        # to say (the daemon starts from them and writes the file after its first probe)
        if not shipped:
            out.problems.append(
                where.finding(
                    "dns",
                    "auto_trust_anchor",
                    dns.auto_trust_anchor,
                    f"{managed} does not exist and this oe-router ships no IANA root anchors "
                    "(oe_router/dns/iana-root-anchors) to start it from: the DNS front stays "
                    "off; put the root's DS records there, or set trust_anchor",
                )
            )
        return
    if (why := _unreadable(managed)) is not None:
        out.notices.append(where.finding("dns", "auto_trust_anchor", dns.auto_trust_anchor, why))
        return
    try:
        TrustPoint.from_text(managed.read_text(encoding="ascii"), str(managed), time.time())
    except (AnchorStateError, OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        if shipped:
            out.notices.append(
                where.finding(
                    "dns",
                    "auto_trust_anchor",
                    dns.auto_trust_anchor,
                    f"cannot be used ({reason}): the daemon validates from the IANA root "
                    "anchors shipped with oe-router until a probe rewrites it",
                )
            )
        else:
            out.problems.append(
                where.finding(
                    "dns",
                    "auto_trust_anchor",
                    dns.auto_trust_anchor,
                    f"cannot be used ({reason}) and no IANA root anchors are shipped: "
                    "the DNS front stays off",
                )
            )


def _identity_key(config: OeConfig, where: _Where, out: FileFindings) -> None:
    ident = config.identity
    key = Path(ident.private_key)
    needed = ident.local_id != "%null"
    if not key.exists():
        if not needed:
            return  # %null needs none (only `oe up --auth pubkey` would use one)
        blocker = _cannot_make(key)
        if blocker is not None:
            out.problems.append(
                where.finding(
                    "identity",
                    "private_key",
                    ident.private_key,
                    f"{key} does not exist and cannot be made ({blocker}): local_id "
                    f"{ident.local_id} needs a key, so the daemon does not start",
                )
            )
            return
        out.notices.append(
            where.finding(
                "identity",
                "private_key",
                ident.private_key,
                f"{key} does not exist yet: the daemon makes one at start (ECDSA P-256, "
                f"mode 0600) and logs the IPSECKEY record to publish for {ident.local_id}",
            )
        )
        return
    if (why := _unreadable(key)) is not None:
        out.notices.append(where.finding("identity", "private_key", ident.private_key, why))
        return
    from oe_router.ike.service import load_private_key

    try:
        load_private_key(key.read_bytes(), str(key))
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        use = (
            f"local_id {ident.local_id} needs it, so the daemon does not start"
            if needed
            else "IKE loads it even for %null, so the daemon does not start (remove the file"
            " or point the option at a usable key)"
        )
        out.problems.append(
            where.finding("identity", "private_key", ident.private_key, f"{reason}: {use}")
        )


def _cannot_make(path: Path) -> str | None:
    """Why the daemon could not write ``path`` (atomic.write_atomic makes missing parent
    folders): the nearest existing ancestor is not a folder this user may write in."""
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is not a folder"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{ancestor} is not writable"
    return None
