"""How DHT keys, subkeys and values become bytes, and how bytes from the network become values again.

Values are msgpack with one extension: a tuple travels as ext type TUPLE_EXT whose data is the msgpack array of
its items (hivemind's encoding), so tuples come back as tuples and lists as lists, also nested in lists, tuples,
dict values and dict keys. Keys and subkeys are plain msgpack, as before (a tuple and a list with the same items
name the same key, and key ids are unchanged); a subkey is read back hashable, every array as a tuple. Other
types (sets, arbitrary objects, integers beyond 64 bits) are refused with a TypeError when storing.

Every byte that comes from the network is treated as hostile. Decoding accepts at most MAX_DECODE_BYTES, refuses
containers nested more than MAX_VALUE_DEPTH deep (tuple extensions are unpacked at most that many levels deep,
so a crafted value cannot exhaust the stack), and raises ProtocolError, never anything else, on malformed
msgpack, an unknown extension type, a malformed tuple extension or an unhashable subkey. Readers drop records
that do not decode (see DHTNode.get); storing nodes keep values as opaque bytes and never decode them, so a
store costs a node no more than it did.

Signatures are unaffected: an owner signs the serialized value bytes exactly as they travel (validation.py),
and encoding is deterministic (msgpack picks the shortest header for each item and ext).
"""

from __future__ import annotations

from typing import Any

import msgpack

from hiveengine.dht.protocol import MAX_VALUE_BYTES
from hiveengine.dht.storage import Record
from hiveengine.errors import ProtocolError

TUPLE_EXT = 0x40  # the msgpack extension type of a tuple (the code hivemind's MSGPackSerializer uses too)
MAX_VALUE_DEPTH = 64  # containers (lists, tuples, dicts) nested in one key, subkey or value, outermost included
MAX_DECODE_BYTES = MAX_VALUE_BYTES  # serialized bytes one decode accepts (no key, subkey or value is larger)

_CONTAINERS = (list, tuple, dict)
_SUPPORTED = "None, bool, int, float, str, bytes, and lists, tuples and dicts of them"


def nesting_problem(obj: Any) -> str | None:
    """Why the structure of `obj` cannot be a DHT key, subkey or value (containers nested more than
    MAX_VALUE_DEPTH deep, or an ExtType, which the DHT reserves), or None. Breadth-first and iterative, each
    container expanded once per level: safe and bounded on any input, shared and cyclic objects included."""
    level = [obj] if isinstance(obj, _CONTAINERS) else []
    depth = 0
    while level:
        depth += 1
        if depth > MAX_VALUE_DEPTH:
            return f"containers are nested more than MAX_VALUE_DEPTH = {MAX_VALUE_DEPTH} deep"
        below = []
        for item in level:
            if isinstance(item, msgpack.ExtType):
                return "msgpack ExtType objects are reserved by the DHT (tuples travel as extensions)"
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            below += [child for child in children if isinstance(child, _CONTAINERS)]
        level = list({id(item): item for item in below}.values())
    return None


# ---- encoding (of what this process stores)


def _default(obj: Any) -> Any:
    """What msgpack in strict-types mode leaves to us: a tuple becomes a TUPLE_EXT; an instance of a subclass of
    a supported type (an IntEnum, a numpy float, an OrderedDict) is packed as its base type, as before."""
    if isinstance(obj, tuple):
        return msgpack.ExtType(TUPLE_EXT, _pack_value(list(obj)))
    for base in (int, float, str, bytes, dict, list):
        if isinstance(obj, base) and type(obj) is not base:
            return base(obj)
    if type(obj) is int:
        raise TypeError(f"the integer {obj} is outside msgpack's range (-2**63 to 2**64 - 1)")
    raise TypeError(f"cannot serialize an object of type {type(obj).__name__}: {obj!r:.80}")


def _pack_value(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, strict_types=True, default=_default)


def pack(obj: Any, what: str = "value") -> bytes:
    """Serialize a DHT key, subkey or value (`what`); TypeError, saying what is wrong, if it cannot be stored."""
    try:
        problem = nesting_problem(obj)
        if problem is not None:
            raise TypeError(problem)
        if what == "value":
            return _pack_value(obj)
        return msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise TypeError(f"DHT {what}s must be msgpack-serializable ({_SUPPORTED}): {e}") from e


# ---- decoding (of bytes that may come from anyone)


def _tuple_hook(ext_depth: int):
    """The ext hook of an unpack `ext_depth` tuple extensions deep: it unpacks a tuple's items one level deeper."""

    def hook(code: int, data: bytes) -> tuple:
        if code != TUPLE_EXT:
            raise ProtocolError(f"unknown msgpack extension type {code} in a DHT value")
        if ext_depth >= MAX_VALUE_DEPTH:
            raise ProtocolError(f"tuples are nested more than MAX_VALUE_DEPTH = {MAX_VALUE_DEPTH} deep")
        items = msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_TUPLE_HOOKS[ext_depth + 1])
        if type(items) is not list:
            raise ProtocolError("malformed tuple extension: its data is not one msgpack array")
        return tuple(items)

    return hook


_TUPLE_HOOKS = [_tuple_hook(depth) for depth in range(MAX_VALUE_DEPTH + 1)]


def _no_ext(code: int, data: bytes):
    raise ProtocolError(f"unexpected msgpack extension type {code} in a DHT subkey")


def unpack(data: bytes, hashable: bool = False) -> Any:
    """Deserialize a value, or with `hashable` a subkey (arrays become tuples; the result must hash).
    ProtocolError on anything malformed, oversized, nested too deep or unhashable."""
    what = "subkey" if hashable else "value"
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) > MAX_DECODE_BYTES:
        raise ProtocolError(f"a serialized DHT {what} must be bytes, at most MAX_DECODE_BYTES = {MAX_DECODE_BYTES}")
    try:
        if hashable:
            obj = msgpack.unpackb(data, raw=False, use_list=False, strict_map_key=False, ext_hook=_no_ext)
        else:
            obj = msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_TUPLE_HOOKS[0])
    except ProtocolError:
        raise
    except Exception as e:  # msgpack's FormatError, StackError, ExtraData; UnicodeDecodeError; unhashable map keys
        raise ProtocolError(f"undecodable DHT {what}: {type(e).__name__}: {e}") from None
    problem = nesting_problem(obj)
    if problem is not None:
        raise ProtocolError(f"unacceptable DHT {what}: {problem}")
    if hashable:
        try:
            hash(obj)
        except TypeError:
            raise ProtocolError(f"a DHT subkey must be hashable; this one holds a map: {obj!r:.80}") from None
    return obj


def record_problem(record: Record) -> str | None:
    """Why a record's value or subkey cannot be read back, or None when both decode."""
    try:
        unpack(record.value)
        if record.subkey is not None:
            unpack(record.subkey, hashable=True)
    except ProtocolError as e:
        return str(e)
    return None
