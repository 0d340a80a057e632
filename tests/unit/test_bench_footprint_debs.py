"""The footprint benchmark's Debian package sizes (libreswan, the Python dependencies as
Debian builds them): read from a cached .deb's control fields, fetched once with
``apt-get download``; what cannot be had is said in the result, not raised."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from bench.bench_footprint import debian_sizes


def _deb(folder: Path, name: str, version: str, installed_kb: int) -> Path:
    root = folder / f"{name}-build"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: all\n"
        f"Maintainer: test <t@example.org>\nInstalled-Size: {installed_kb}\n"
        "Description: test\n"
    )
    out = folder / f"{name}_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--build", str(root), str(out)], check=True, capture_output=True)
    return out


def _fake_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    apt = bin_dir / "apt-get"
    apt.write_text("#!/bin/sh\n" + script)
    apt.chmod(0o755)
    log = tmp_path / "apt.log"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("APT_LOG", str(log))
    return log


def test_a_cached_deb_is_read_and_not_fetched_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "debs"
    cache.mkdir()
    _deb(cache, "libreswan", "4.10-2", 6177)
    log = _fake_apt(tmp_path, monkeypatch, 'echo "$@" >> "$APT_LOG"; exit 1\n')
    sizes, missing = debian_sizes(("libreswan",), cache)
    assert sizes == {"libreswan": {"installed_kb": 6177, "version": "4.10-2"}}
    assert missing == {}
    assert not log.exists()  # no apt-get call for a cached package


def test_a_missing_deb_is_downloaded_once_into_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "debs"
    store = tmp_path / "store"
    store.mkdir()
    built = _deb(store, "python3-dnspython", "2.3.0-1", 1022)
    log = _fake_apt(tmp_path, monkeypatch, f'echo "$@" >> "$APT_LOG"; cp {built} .\n')
    for _ in range(2):
        sizes, missing = debian_sizes(("python3-dnspython",), cache)
        assert sizes == {"python3-dnspython": {"installed_kb": 1022, "version": "2.3.0-1"}}
        assert missing == {}
    assert log.read_text() == "download python3-dnspython\n"


def test_what_apt_cannot_download_is_reported_with_apts_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_apt(tmp_path, monkeypatch, 'echo "E: Unable to locate package $2" >&2; exit 100\n')
    sizes, missing = debian_sizes(("libreswan",), tmp_path / "debs")
    assert sizes == {}
    assert missing == {
        "libreswan": "apt-get download failed: E: Unable to locate package libreswan"
    }
