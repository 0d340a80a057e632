"""Register a module without running its code until a name of it is asked for.

Why: ``pyroute2/__init__.py`` imports every part of pyroute2 (NDB with sqlite3, IPDB, the
CLI with http.server, ctypes, unittest ...) to re-export names, and Python runs a package's
``__init__`` before any of its submodules. The daemon uses a handful of submodules
(``pyroute2.netlink``, ``nlsocket``, ``iproute.linux``); the rest cost ~10 MB of RSS and
~0.1 s of start on a PC. Likewise dnspython imports ``importlib.metadata`` (zipfile, email,
csv: ~3.5 MB) for a version probe that need not run. ``defer("pyroute2")`` registers the
module with its spec only (``__path__`` for a package), so ``import pyroute2.netlink``
loads just that chain. A name its code would have defined (``from pyroute2 import
IPRoute``, ``importlib.metadata.version``) still works: the first such lookup runs the
real code then (PEP 562 module ``__getattr__``).

Not ``importlib.util.LazyLoader``: on Python 3.11 a later ``import`` of a lazy module
reads its ``__spec__`` and so loads it at once.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType

__all__ = ["defer", "exports"]


def defer(name: str) -> ModuleType | None:
    """Register module ``name`` without running its code; the module, or None when it is
    not installed or is imported already (then nothing changes)."""
    if name in sys.modules:
        return None
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)  # __spec__, __path__; no code run
    loader = spec.loader
    package = spec.submodule_search_locations is not None
    state = {"ran": False}

    def __getattr__(attr: str) -> object:  # PEP 562: called for names not found
        if state["ran"]:
            raise AttributeError(f"module {name!r} has no attribute {attr!r}")
        # ``from pyroute2 import config`` asks for a submodule: import just that one
        sub = f"{name}.{attr}"
        if package and not attr.startswith("__") and importlib.util.find_spec(sub) is not None:
            return importlib.import_module(sub)
        state["ran"] = True
        loader.exec_module(module)  # the real code, in this module's namespace
        return getattr(module, attr)

    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
    return module


def exports(package: str, where: dict[str, str]) -> Callable[[str], object]:
    """A package's PEP 562 ``__getattr__`` for names its submodules define: ``where`` maps
    each name to its submodule (``{"ControlClient": "client"}``), imported on the first
    lookup of one of its names. Why: a package ``__init__`` that imports its submodules to
    re-export them makes every user pay for all of them (the ``oe`` CLI, which needs a
    socket client, paid for asyncio and the daemon's status model)."""

    def __getattr__(attr: str) -> object:
        sub = where.get(attr)
        if sub is None:
            raise AttributeError(f"module {package!r} has no attribute {attr!r}")
        value = getattr(importlib.import_module(f"{package}.{sub}"), attr)
        setattr(sys.modules[package], attr, value)  # the next lookup is a plain one
        return value

    return __getattr__
