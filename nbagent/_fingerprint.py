"""Step identity: normalized source, the names a cell reads, and value hashes.

A step replays only when its normalized source and the values of the
variables it reads are unchanged. Hashes are *structural* and stable across
processes: ``pickle`` alone is not (a set of strings pickles in hash-seed
order, and notebook functions cannot be pickled by reference), so containers,
sets, arrays and functions are walked here and only other objects fall back
to pickle. Bulk data (NumPy buffers, pandas blocks via pickle protocol 5
out-of-band buffers) is fed to xxh3 without copying, at several GB/s.
"""

from __future__ import annotations

import ast
import pickle
import types
from collections.abc import Iterable, Mapping
from typing import Any

import xxhash

#: Objects that cannot be hashed get this token plus their type, so an
#: unpicklable client or lock does not invalidate every step that touches it.
OPAQUE = "opaque:"

_MAX_DEPTH = 64


#: Version of the normalized-source hash kept in step records. 2: one walk of the AST
#: (:func:`fingerprint`); 1 hashed ``ast.dump`` (same meaning, several times slower).
FINGERPRINT_VERSION = 2


def fingerprint(tree: ast.AST) -> tuple[str, set[str]]:
    """(hash of the normalized source, names the code reads), from one walk of its AST.

    The hash covers every node's type and fields, never positions: comments,
    blank lines and spacing do not count. Names read: every name loaded anywhere
    (inside the functions the code defines too), and names declared ``global`` or
    ``nonlocal``. Each node is one part (its type, its list lengths, the repr of
    each plain field), so two different trees cannot give the same parts.
    """
    parts: list[str] = []
    reads: set[str] = set()
    stack: list[Any] = [tree]
    pop, push, add = stack.pop, stack.append, parts.append
    node: Any
    while stack:
        node = pop()
        t = type(node)
        if t is list:
            add(f"[{len(node)}")
            stack.extend(reversed(node))
        elif issubclass(t, ast.AST):
            add(t.__name__)
            if t is ast.Name:
                if type(node.ctx) is ast.Load:
                    reads.add(node.id)
            elif t is ast.Global or t is ast.Nonlocal:
                reads.update(node.names)
            for name in reversed(t._fields):
                push(getattr(node, name, None))
        else:
            add(repr(node))
    text = "\x1f".join(parts)
    return xxhash.xxh3_128_hexdigest(text.encode("utf-8", "surrogatepass")), reads


def source_hash(source: str) -> str:
    """:func:`fingerprint`'s hash of source text; text that does not parse: its stripped lines."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        text = "\n".join(line.rstrip() for line in source.strip().splitlines())
        return xxhash.xxh3_128_hexdigest(text.encode("utf-8", "surrogatepass"))
    return fingerprint(tree)[0]


def legacy_source_hash(source: str) -> str:
    """The hash of :data:`FINGERPRINT_VERSION` 1 (``ast.dump``), to compare older records."""
    try:
        text = ast.dump(ast.parse(source))
    except SyntaxError:
        text = "\n".join(line.rstrip() for line in source.strip().splitlines())
    return xxhash.xxh3_128_hexdigest(text.encode("utf-8", "surrogatepass"))


def legacy_tree_hash(tree: ast.AST) -> str:
    """:func:`legacy_source_hash` of the source ``tree`` was parsed from."""
    return xxhash.xxh3_128_hexdigest(ast.dump(tree).encode("utf-8", "surrogatepass"))


def tree_hash(tree: ast.AST) -> str:
    """``source_hash`` of the source ``tree`` was parsed from, without parsing it again."""
    return fingerprint(tree)[0]


def names_read(tree: ast.AST) -> set[str]:
    """Every name loaded anywhere in the code (including inside functions it defines)."""
    return fingerprint(tree)[1]


def names_deleted(tree: ast.Module) -> set[str]:
    """Names the cell deletes at module level (``del x``)."""
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Delete):
            found.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return found


def _code_globals(code: types.CodeType) -> Iterable[str]:
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_globals(const)


def reachable_names(names: Iterable[str], namespace: Mapping[str, Any]) -> set[str]:
    """Names plus the globals that the namespace's own functions among them read.

    A cell calling ``add_finding(x)`` where ``add_finding`` appends to a global
    ``findings`` mutates ``findings`` without naming it: follow functions
    defined in the notebook (their ``__globals__`` is the namespace).
    """
    seen: set[str] = set()
    todo = [n for n in names if n in namespace]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        value = namespace[name]
        func = getattr(value, "__func__", value)
        code = getattr(func, "__code__", None)
        if isinstance(code, types.CodeType) and getattr(func, "__globals__", None) is namespace:
            todo.extend(n for n in _code_globals(code) if n in namespace and n not in seen)
    return seen


class _Hasher:
    def __init__(self) -> None:
        self.h = xxhash.xxh3_128()
        self.active: set[int] = set()
        #: set when the value itself (not a part of it) could not be hashed
        self.top_opaque = ""

    def tag(self, text: str) -> None:
        self.h.update(text.encode())

    def feed(self, obj: Any, depth: int = 0) -> None:
        t = type(obj)
        h = self.h
        if obj is None or t is bool or t is int or t is float or t is complex:
            self.tag(f"{t.__name__}:{obj!r};")
        elif t is str:
            data = obj.encode("utf-8", "surrogatepass")
            self.tag(f"s{len(data)}:")
            h.update(data)
        elif t is bytes or t is bytearray:
            self.tag(f"b{len(obj)}:")
            h.update(obj)
        elif depth > _MAX_DEPTH:
            self.pickled(obj)
        elif t is list or t is tuple or t is dict or t is set or t is frozenset:
            if id(obj) in self.active:
                self.tag("cycle;")
                return
            self.active.add(id(obj))
            try:
                if t is dict:
                    self.tag(f"d{len(obj)}:")
                    for k, v in obj.items():
                        self.feed(k, depth + 1)
                        self.feed(v, depth + 1)
                elif t is set or t is frozenset:
                    self.tag(f"{t.__name__}{len(obj)}:")
                    for digest in sorted(hash_value(v) for v in obj):
                        self.tag(digest)
                else:
                    self.tag(f"{t.__name__}{len(obj)}:")
                    for v in obj:
                        self.feed(v, depth + 1)
            finally:
                self.active.discard(id(obj))
        elif isinstance(obj, types.ModuleType):
            self.tag(f"module:{obj.__name__};")
        elif isinstance(obj, type):
            self.tag(f"type:{obj.__module__}.{obj.__qualname__};")
        elif isinstance(obj, types.FunctionType | types.MethodType):
            self.function(obj, depth)
        elif t.__module__ == "numpy" and t.__name__ == "ndarray" and obj.dtype.hasobject is False:
            import numpy as np

            self.tag(f"ndarray:{obj.dtype.str}:{obj.shape};")
            h.update(np.ascontiguousarray(obj).reshape(-1).view(np.uint8))  # type: ignore[arg-type]
        elif _is_handle(t):
            token = opaque_token(obj)
            if not self.active:
                self.top_opaque = token
            self.tag(token + ";")
        elif (
            t.__reduce_ex__ is object.__reduce_ex__
            and t.__reduce__ is object.__reduce__
            and self.reduced(obj)
        ):
            pass  # a plain instance: its state walked like a dict (sets inside sorted)
        else:
            self.pickled(obj)

    def function(self, fn: Any, depth: int) -> None:
        func = getattr(fn, "__func__", fn)
        self.tag(f"fn:{getattr(func, '__module__', '')}.{func.__qualname__};")
        code = getattr(func, "__code__", None)
        if code is not None:
            self.code(code)
        self.feed(getattr(func, "__defaults__", None), depth + 1)
        if isinstance(fn, types.MethodType):
            self.feed(fn.__self__, depth + 1)

    def code(self, code: types.CodeType) -> None:
        self.h.update(code.co_code)
        self.tag(repr(code.co_names))
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                self.code(const)
            else:  # structurally: repr() of a frozenset constant depends on the hash seed
                self.feed(const, 1)

    def pickled(self, obj: Any) -> None:
        buffers: list[pickle.PickleBuffer] = []
        try:
            data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
        except Exception:
            if self.reduced(obj):
                return
            try:
                import cloudpickle

                buffers.clear()
                data = cloudpickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
            except Exception:
                token = opaque_token(obj)
                if not self.active:
                    self.top_opaque = token
                self.tag(token + ";")
                return
        self.tag(f"p{len(data)}:")
        self.h.update(data)
        for buf in buffers:
            raw = buf.raw()
            self.tag(f"B{raw.nbytes}:")
            self.h.update(raw)

    def reduced(self, obj: Any) -> bool:
        """Hash what pickle cannot store by reference from its ``__reduce_ex__`` parts.

        An instance of a class defined in the notebook (a dataclass, say) is not
        importable; cloudpickle would embed the class with a per-process id, so
        the hash would change at every restart. Walk the parts instead (the
        class by name, its state structurally). False when there are no parts.
        """
        if id(obj) in self.active:
            self.tag("cycle;")
            return True
        if len(self.active) > _MAX_DEPTH:
            return False
        try:
            rv = obj.__reduce_ex__(5)
        except Exception:
            return False
        if not isinstance(rv, tuple) or len(rv) < 2:
            return False
        self.active.add(id(obj))
        try:
            self.tag(f"R:{type(obj).__module__}.{type(obj).__qualname__}:{len(rv)};")
            for i, part in enumerate(rv[:5]):
                if i >= 3 and part is not None:  # list items / dict items iterators
                    part = list(part)
                self.feed(part, len(self.active))
        finally:
            self.active.discard(id(obj))
        return True


#: Handles on outside services (LLM and HTTP clients, their transports, connections,
#: nbagent's simulator and fake payments): not data. Their internal state (connection
#: pools, request logs, per-process ids) changes with every call and every process, so
#: hashing it would make each step that uses a client execute again after a restart
#: (and pay for its LLM calls again). They hash by type, like unpicklable values.
_HANDLE_CLASSES = frozenset(
    {
        "openai._base_client.BaseClient",
        "openai._resource.SyncAPIResource",
        "openai._resource.AsyncAPIResource",
        "httpx2._client.BaseClient",
        "httpx2._transports.base.BaseTransport",
        "httpx2._transports.base.AsyncBaseTransport",
        "httpx._client.BaseClient",
        "httpx._transports.base.BaseTransport",
        "httpx._transports.base.AsyncBaseTransport",
        "requests.sessions.Session",
        "sqlite3.Connection",
        "socket.socket",
        "nbagent._engine.Run",
        "nbagent._store.Store",
        "nbagent._payments.FakePayments",
        "nbagent._cassette.Cassette",
        "nbagent._pricing.PriceBook",
    }
)
_handle_types: dict[type, bool] = {}


def _is_handle(t: type) -> bool:
    known = _handle_types.get(t)
    if known is None:
        known = _handle_types[t] = any(
            f"{c.__module__}.{c.__qualname__}" in _HANDLE_CLASSES for c in t.__mro__
        )
    return known


def hash_value(obj: Any) -> str:
    """A stable content hash of a value (hex); equal values give equal hashes.

    Values that cannot be hashed (unpicklable clients, locks, generators)
    give ``"opaque:<type>"`` so they never force a re-run by themselves.
    """
    t = type(obj)
    if t in _SCALARS:  # what _Hasher.feed hashes for them, in one call
        return xxhash.xxh3_128_hexdigest(f"{t.__name__}:{obj!r};".encode())
    if t is str:
        data = obj.encode("utf-8", "surrogatepass")
        return xxhash.xxh3_128_hexdigest(f"s{len(data)}:".encode() + data)
    if t is Unrestored:  # stands for a value that could not be stored
        return obj._token
    hasher = _Hasher()
    try:
        hasher.feed(obj)
    except RecursionError:
        return opaque_token(obj)
    return hasher.top_opaque or hasher.h.hexdigest()


_SCALARS = frozenset({type(None), bool, int, float, complex})


def opaque_token(obj: Any) -> str:
    return f"{OPAQUE}{type(obj).__module__}.{type(obj).__qualname__}"


class Unrestored:
    """Stands in for a variable a step made but could not store.

    After a restart the step replays without it; any use names the step and
    the fix instead of failing with a bare ``NameError`` somewhere later.
    """

    __slots__ = ("_name", "_step", "_reason", "_token")
    _name: str
    _step: str
    _reason: str
    _token: str

    def __init__(self, name: str, step: str, reason: str, token: str) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_step", step)
        object.__setattr__(self, "_reason", reason)
        object.__setattr__(self, "_token", token)

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        from ._errors import UnrestoredValueError

        raise UnrestoredValueError(
            f"{self._name!r} was made by step {self._step!r} but could not be stored "
            f"({self._reason}), so it is gone after the restart. Re-run that step with "
            f"`%%step {self._step} --rerun` (or make {self._name!r} in a setup cell outside a step)."
        )

    __getattr__ = __call__ = __iter__ = __len__ = __getitem__ = __enter__ = _fail
    __setattr__ = __bool__ = __await__ = _fail  # type: ignore[assignment]
    # `with x:` / `async with x:` look both methods up on the type before calling either:
    # without the exit half a lock used in a `with` fails with a bare TypeError
    __exit__ = __aenter__ = __aexit__ = __contains__ = __next__ = _fail
    __setitem__ = __delitem__ = _fail

    def __repr__(self) -> str:
        return f"<{self._name}: not restored, made by step {self._step!r} ({self._reason})>"


def is_opaque(digest: str) -> bool:
    return digest.startswith(OPAQUE)


def is_user_name(name: str) -> bool:
    """Names IPython and nbagent own are never inputs or saved state."""
    return not name.startswith("_") and name not in _SHELL_NAMES


_SHELL_NAMES = frozenset({"In", "Out", "get_ipython", "exit", "quit", "open"})

__all__ = [
    "hash_value",
    "names_deleted",
    "fingerprint",
    "names_read",
    "reachable_names",
    "source_hash",
]
