"""/proc/crypto: the kernel's crypto implementations, and which of them are hardware.

Why parse the text: it is the one place that lists every registered implementation
with its driver name, module, priority and self-test state, on every kernel the
project runs on (NETLINK_CRYPTO needs CONFIG_CRYPTO_USER, often absent on OpenWrt).
The kernel uses the highest-priority tested, non-internal implementation of a name;
``drivers_for`` gives that order, so its first entry is what AF_ALG and XFRM get.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from oe_router.records import record

from .engine import EngineKind

__all__ = ["CryptoAlg", "classify", "drivers_for", "parse_proc_crypto", "read_proc_crypto"]


@record(frozen=True)
class CryptoAlg:
    """One /proc/crypto entry. Sizes are None where the entry's type does not show them.

    ``selftest`` is the kernel's word: "passed", or "unknown" (not yet tested, or failed:
    the kernel never hands out an untested implementation). ``extra`` keeps fields this
    parser has no attribute for (newer kernels add some), as (key, value) pairs.
    """

    name: str
    driver: str
    module: str
    priority: int
    type: str
    internal: bool = False
    selftest: str = "unknown"
    async_: bool = False
    refcnt: int | None = None
    blocksize: int | None = None
    min_keysize: int | None = None
    max_keysize: int | None = None
    ivsize: int | None = None
    maxauthsize: int | None = None
    digestsize: int | None = None
    chunksize: int | None = None
    walksize: int | None = None
    seedsize: int | None = None
    statesize: int | None = None
    geniv: str | None = None
    extra: tuple[tuple[str, str], ...] = ()


# /proc/crypto key (spaces -> "_") -> attribute; the int ones are parsed as decimals.
_INT_FIELDS = frozenset(
    {
        "priority", "refcnt", "blocksize", "min_keysize", "max_keysize", "ivsize",
        "maxauthsize", "digestsize", "chunksize", "walksize", "seedsize", "statesize",
    }
)  # fmt: skip
_STR_FIELDS = frozenset({"name", "driver", "module", "type", "selftest", "geniv"})


def _entry(fields: list[tuple[str, str]]) -> CryptoAlg | None:
    kw: dict[str, object] = {}
    extra: list[tuple[str, str]] = []
    for key, value in fields:
        if key in _INT_FIELDS:
            try:
                kw[key] = int(value)
            except ValueError:
                extra.append((key, value))
        elif key in _STR_FIELDS:
            kw[key] = value
        elif key == "internal":
            kw["internal"] = value == "yes"
        elif key == "async":
            kw["async_"] = value == "yes"
        else:
            extra.append((key, value))
    if not {"name", "driver"} <= kw.keys():
        return None  # not an entry (a truncated read): nothing to name it by
    kw.setdefault("module", "kernel")
    kw.setdefault("priority", 0)
    kw.setdefault("type", "unknown")
    return CryptoAlg(**kw, extra=tuple(extra))  # type: ignore[arg-type]


def parse_proc_crypto(text: str) -> tuple[CryptoAlg, ...]:
    """Every entry of /proc/crypto's text, in the file's order (blank-line separated)."""
    algs: list[CryptoAlg] = []
    fields: list[tuple[str, str]] = []
    for line in [*text.splitlines(), ""]:
        if not line.strip():
            if fields:
                alg = _entry(fields)
                if alg is not None:
                    algs.append(alg)
                fields = []
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.append(("_".join(key.split()), value.strip()))
    return tuple(algs)


def read_proc_crypto(path: str = "/proc/crypto") -> tuple[CryptoAlg, ...]:
    """The parsed file; an empty tuple when there is none (no crypto API, not Linux)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse_proc_crypto(f.read())
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return ()


# Modules of crypto accelerators: a separate engine the CPU hands requests to. Names as
# the kernel shows them (KBUILD_MODNAME, "-" is "_").
_HW_MODULES = frozenset(
    {
        "virtio_crypto",
        "crypto_safexcel",  # Inside Secure EIP97/EIP197 (Marvell Armada, MediaTek)
        "crypto_hw_eip93", "mtk_eip93", "eip93",  # EIP93 (MT7621, Airoha): upstream, OpenWrt
        "caam", "caamalg", "caamalg_qi", "caamalg_qi2", "caamhash", "caam_jr", "dpaa2_caam",
        "talitos",
        "sun8i_ce", "sun8i_ss", "sun4i_ss",  # Allwinner Crypto Engine / Security System
        "qcrypto", "qce",  # Qualcomm crypto engine (IPQ40xx, IPQ806x)
        "marvell_cesa", "mv_cesa", "octeontx_cpt", "octeontx2_cpt", "rvu_cptvf",
        "atmel_aes", "atmel_sha", "atmel_tdes",
        "omap_aes_driver", "omap_sham", "omap_des",
        "ccp", "ccp_crypto", "ccree",
        "hisi_sec", "hisi_sec2",
        "n5pf",  # Cavium NITROX
        "chcr",  # Chelsio
        "intel_qat", "qat_dh895xcc", "qat_c3xxx", "qat_c62x", "qat_4xxx", "qat_420xx",
        "rk_crypto", "rockchip_crypto", "stm32_cryp", "stm32_hash", "amlogic_gxl_crypto",
        "mxs_dcp", "s5p_sss", "ixp4xx_crypto", "mtk_crypto", "img_hash", "geode_aes",
        "nx_crypto", "zynqmp_aes_gcm", "aspeed_crypto", "keembay_ocs_aes", "starfive_crypto",
    }
)  # fmt: skip

# Driver-name marks of the same engines, for built-in drivers (module "kernel") and for
# template instances, whose module is the template's ("authenc", "gcm") while a component
# runs on the engine: "authenc(hmac(sha256-generic),virtio_crypto_aes_cbc)". Each part
# of the name between "(", ")" and "," is matched on its own. "sun8i-ce" is the Allwinner
# engine, while a bare "-ce" suffix ("cbc-aes-ce", "gcm-aes-ce") is ARMv8 Crypto
# Extensions, CPU instructions: only the vendor word makes it hardware.
_HW_DRIVER = re.compile(
    r"^(virtio_crypto|safexcel|qat_|n5_|mv-|hisi|nx-)"
    r"|(^|[-_])(safexcel|eip93|caam(-qi2?)?|talitos|sun8i-ce|sun8i-ss|sun4i-ss|qce|cesa|atmel"
    r"|omap|ccp|ccree|hisi|chcr|nitrox|rk|stm32|gxl|dcp|s5p|ixp4xx|mtk|img|geode|aspeed"
    r"|keembay|starfive|zynqmp|octeon(tx2?)?)([-_]|$)"
)


def classify(alg: CryptoAlg) -> EngineKind:
    """HARDWARE for a crypto accelerator's driver, CPU for everything else.

    The module decides first (a driver module is one engine's); then the driver name's
    parts (built-in drivers, template instances wrapping an engine's driver). Generic C
    ("aes-generic"), x86 instructions ("*-aesni", "*-avx2", "*-ssse3"), ARM NEON and ARMv8
    CE ("*-neon", "cbc-aes-ce") all run on the CPU; so does anything unrecognised:
    calling an unknown driver hardware would route packets to it on a guess.
    """
    if alg.module.replace("-", "_") in _HW_MODULES:
        return EngineKind.HARDWARE
    for part in re.split(r"[(),\s]+", alg.driver):
        if part and _HW_DRIVER.search(part):
            return EngineKind.HARDWARE
    return EngineKind.CPU


def drivers_for(algs: Iterable[CryptoAlg], name: str) -> list[CryptoAlg]:
    """Usable implementations of algorithm ``name`` (tested, not internal, not a larval:
    a lookup in progress), the kernel's pick first: highest priority, ties in
    /proc/crypto's order (the kernel takes the first it finds)."""
    usable = [
        a
        for a in algs
        if a.name == name and not a.internal and a.selftest == "passed" and a.type != "larval"
    ]
    return sorted(usable, key=lambda a: -a.priority)
