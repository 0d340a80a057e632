"""libubus's ABI as the shim uses it: struct layouts, exported functions, constants.

These are facts about the ABI of libubus and libubox (libubus.h, ubusmsg.h, avl.h,
list.h, uloop.h, blobmsg.h as built from the snapshots in ../shared/vendor/openwrt), not
code: which fields, in which order, of which C type. They are laid out per userland ABI
by ``oe_router.cabi`` (pointer size and alignment), so one development host can check
the 32- and 64-bit layouts: tests/unit/test_ubus_abi.py compiles the real headers with
gcc -m64 and -m32 and compares every offset and size.

What the shim needs, and why:

- ``ubus_object``, ``ubus_object_type``, ``ubus_method``, ``blobmsg_policy``: the object
  it registers, made in Python memory (libubus keeps pointers to them);
- ``ubus_request_data``: a call in progress; the shim copies it to answer later (what
  the static inline ``ubus_defer_request`` does) and reads ``object`` to check the layout;
- ``ubus_request``: only its size, for the asynchronous event send;
- ``ubus_object_data``: what ``ubus_lookup`` reports (the self-test reads the signature);
- ``ubus_context``: only its first members up to the socket (``sock``: the fd asyncio
  watches, the read callback ``ubus_handle_event`` would call, the ``eof`` flag). What
  follows ``sock`` (a ``struct timeval``, so time_t's width on 32-bit libcs) is never
  touched.

A libubus without ``ubus_invoke_async_fd`` predates file-descriptor passing (2021), which
changed ``ubus_request_data`` and ``ubus_request``: the shim refuses it (``REQUIRED``).
"""

from __future__ import annotations

import ctypes
import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from oe_router.cabi import I8, I32, PTR, U8, U16, U32, Abi, StructTable, host_abi, struct_type
from oe_router.records import record

LIST_HEAD = StructTable("list_head", (("next", PTR), ("prev", PTR)))
AVL_NODE = StructTable(
    "avl_node",
    (("list", LIST_HEAD), ("parent", PTR), ("left", PTR), ("right", PTR), ("key", PTR),
     ("balance", I8), ("leader", U8)),
)  # fmt: skip
AVL_TREE = StructTable(
    "avl_tree",
    (("list_head", LIST_HEAD), ("root", PTR), ("count", U32), ("allow_dups", U8),
     ("comp", PTR), ("cmp_ptr", PTR)),
)  # fmt: skip
ULOOP_FD = StructTable(
    "uloop_fd",
    (("cb", PTR), ("fd", I32), ("eof", U8), ("error", U8), ("registered", U8), ("flags", U8)),
)
#: The first members of ``struct ubus_context``, up to and with ``sock`` (a prefix: its
#: size is not the struct's).
UBUS_CONTEXT = StructTable(
    "ubus_context",
    (("requests", LIST_HEAD), ("objects", AVL_TREE), ("pending", LIST_HEAD), ("sock", ULOOP_FD)),
)
BLOBMSG_POLICY = StructTable("blobmsg_policy", (("name", PTR), ("type", I32)))
# mask, tags: unsigned long, pointer-sized
UBUS_METHOD = StructTable(
    "ubus_method",
    (("name", PTR), ("handler", PTR), ("mask", PTR), ("tags", PTR), ("policy", PTR),
     ("n_policy", I32)),
)  # fmt: skip
UBUS_OBJECT_TYPE = StructTable(
    "ubus_object_type", (("name", PTR), ("id", U32), ("methods", PTR), ("n_methods", I32))
)
UBUS_OBJECT = StructTable(
    "ubus_object",
    (("avl", AVL_NODE), ("name", PTR), ("id", U32), ("path", PTR), ("type", PTR),
     ("subscribe_cb", PTR), ("has_subscribers", U8), ("methods", PTR), ("n_methods", I32)),
)  # fmt: skip
UBUS_ACL_KEY = StructTable("ubus_acl_key", (("user", PTR), ("group", PTR), ("object", PTR)))
UBUS_REQUEST_DATA = StructTable(
    "ubus_request_data",
    (("object", U32), ("peer", U32), ("seq", U16), ("acl", UBUS_ACL_KEY), ("deferred", U8),
     ("fd", I32), ("req_fd", I32)),
)  # fmt: skip
UBUS_REQUEST = StructTable(
    "ubus_request",
    (("list", LIST_HEAD), ("pending", LIST_HEAD), ("status_code", I32), ("status_msg", U8),
     ("blocked", U8), ("cancelled", U8), ("notify", U8), ("peer", U32), ("seq", U16),
     ("raw_data_cb", PTR), ("data_cb", PTR), ("fd_cb", PTR), ("complete_cb", PTR),
     ("fd", I32), ("ctx", PTR), ("priv", PTR)),
)  # fmt: skip
UBUS_OBJECT_DATA = StructTable(
    "ubus_object_data", (("id", U32), ("type_id", U32), ("path", PTR), ("signature", PTR))
)

#: Every table the shim lays out; ``PREFIXES`` are only the start of the C struct.
TABLES: tuple[StructTable, ...] = (
    LIST_HEAD, AVL_NODE, AVL_TREE, ULOOP_FD, UBUS_CONTEXT, BLOBMSG_POLICY, UBUS_METHOD,
    UBUS_OBJECT_TYPE, UBUS_OBJECT, UBUS_ACL_KEY, UBUS_REQUEST_DATA, UBUS_REQUEST,
    UBUS_OBJECT_DATA,
)  # fmt: skip
PREFIXES = frozenset({"ubus_context"})


class Status(enum.IntEnum):
    """ubusmsg.h ``enum ubus_msg_status``: a call's result code."""

    OK = 0
    INVALID_COMMAND = 1
    INVALID_ARGUMENT = 2
    METHOD_NOT_FOUND = 3
    NOT_FOUND = 4
    NO_DATA = 5
    PERMISSION_DENIED = 6
    TIMEOUT = 7
    NOT_SUPPORTED = 8
    UNKNOWN_ERROR = 9
    CONNECTION_FAILED = 10
    NO_MEMORY = 11
    PARSE_ERROR = 12
    SYSTEM_ERROR = 13


ULOOP_READ = 1  # uloop.h: the event ubus_handle_event passes to the socket's callback
UBUS_SYSTEM_OBJECT_EVENT = 1  # ubusmsg.h: the object "send" events go to
#: ubus's default UBUS_MAX_MSGLEN (CMakeLists.txt): ubusd drops larger messages
MAX_MSGLEN = 1048576

# C function types (as ctypes prototypes): the method handler libubus calls, the socket's
# read callback, the lookup callback.
HANDLER = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p,
    ctypes.c_void_p,
)  # fmt: skip
FD_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint)
LOOKUP_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)

_P, _I, _U32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32

#: The exported functions the shim calls: name -> (restype, argtypes). A library that
#: lacks one of them is refused before any call.
REQUIRED: Mapping[str, tuple[Any, tuple[Any, ...]]] = MappingProxyType(
    {
        "ubus_connect": (_P, (ctypes.c_char_p,)),
        "ubus_free": (None, (_P,)),
        "ubus_add_object": (_I, (_P, _P)),
        "ubus_remove_object": (_I, (_P, _P)),
        "ubus_lookup": (_I, (_P, ctypes.c_char_p, LOOKUP_CALLBACK, _P)),
        "ubus_lookup_id": (_I, (_P, ctypes.c_char_p, ctypes.POINTER(_U32))),
        "ubus_send_reply": (_I, (_P, _P, _P)),
        "ubus_complete_deferred_request": (None, (_P, _P, _I)),
        "ubus_invoke_async_fd": (_I, (_P, _U32, ctypes.c_char_p, _P, _P, _I)),
        "ubus_notify": (_I, (_P, _P, ctypes.c_char_p, _P, _I)),
        "ubus_strerror": (ctypes.c_char_p, (_I,)),
    }
)


@record(frozen=True)
class Layout:
    """The ctypes classes of every table for one ABI."""

    abi: Abi
    structs: Mapping[str, type[Any]]

    def __getitem__(self, name: str) -> type[Any]:
        return self.structs[name]


def layout(abi: Abi) -> Layout:
    done: dict[str, type[Any]] = {}
    return Layout(abi, MappingProxyType({t.name: struct_type(t, abi, done) for t in TABLES}))


#: This process's layouts (what the shim uses).
HOST_LAYOUT = layout(host_abi())
