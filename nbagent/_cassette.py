"""Cassettes: record the HTTP exchanges of real LLM calls to a file, replay them offline.

A :class:`Cassette` is an httpx2 transport (sync and async). It sits *under* the
official openai client, so the SDK builds requests and parses replies exactly as it
does online, and it composes with nbagent's traced client (which wraps whatever
transport the ``http_client`` has)::

    # record once, with a key (or through the simulator in tests)
    client = nbagent.cassette_client("lessons/01.cassette.jsonl", mode="record")

    # replay anywhere (Binder, CI), no key, no network
    client = nbagent.cassette_client("lessons/01.cassette.jsonl")

    # traced + replayed: hand the cassette to the traced client as its transport
    client = nbagent.openai_client(
        http_client=httpx2.Client(transport=nbagent.Cassette("lessons/01.cassette.jsonl")),
    )

Record and replay through the same client stack: the traced client adds
``stream_options.include_usage`` to chat streams, so a stream recorded with the bare
:func:`cassette_client` is a different request for the traced client (the miss error
then says the closest recording "differs in: stream_options").

Modes
    ``"replay"`` serves recorded responses and never touches the network; ``"record"``
    starts a new file and passes every request to ``inner`` (default: a real
    ``httpx2.HTTPTransport()``), writing each exchange; ``"auto"`` replays when the file
    holds at least one exchange and records otherwise.

Matching
    A request matches a recording with the same method, path (plus query) and hash of
    its normalized JSON body (keys sorted, no whitespace). The same request made twice
    gets the two recordings in the order they were made; once all recordings of a
    request were served, they are served again from the first (a re-run notebook cell
    sees the same answers), unless ``repeat=False``. An unmatched request raises
    :class:`CassetteMiss`, which the openai client passes through unchanged.

File format (JSON Lines, UTF-8, one object per line, appended one line per exchange)
    The first line is a header ``{"nbagent_cassette": 1, "created": <unix time>}``. Every
    other line is one exchange::

        {"method": "POST", "path": "/v1/chat/completions", "key": "<sha256 hex>",
         "request": {...the JSON request body...},
         "status": 200, "headers": {"content-type": "application/json", ...},
         "json": {...}        # a JSON body, or
         "text": "data: ...", # any other UTF-8 body (a stream's full SSE bytes), or
         "b64": "...",        # anything else (e.g. a compressed body)
         "stream": false, "complete": true, "ts": ..., "latency_s": ...}

    ``complete`` is false when the client stopped reading a stream early (the partial
    bytes are what it saw); ``error`` holds the transport error that cut a stream.
    Only safe response headers are kept (:data:`SAFE_RESPONSE_HEADERS`); request
    headers (Authorization, API keys, cookies, organization) are never written, and the
    bearer token is masked if it ever appears in a body.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Literal

import httpx2

from ._errors import NbagentError

__all__ = [
    "FORMAT",
    "SAFE_RESPONSE_HEADERS",
    "Cassette",
    "CassetteError",
    "CassetteMiss",
    "cassette_client",
    "request_key",
]

#: Version of the cassette file format (the header line's ``nbagent_cassette``).
FORMAT = 1

#: Response headers a cassette keeps; every other header is dropped.
SAFE_RESPONSE_HEADERS: frozenset[str] = frozenset(
    {
        "content-type",
        "content-encoding",
        "x-request-id",
        "openai-processing-ms",
        "retry-after",
        "retry-after-ms",
    }
)

#: Header added to every replayed response, so a wrapping transport can tell.
REPLAY_HEADER = "x-nbagent-cassette"

#: The dummy key of replay-only clients (never sent anywhere).
REPLAY_API_KEY = "sk-cassette-replay"

Mode = Literal["replay", "record", "auto"]

_MASK = "[REDACTED]"


class CassetteError(NbagentError):
    """A cassette cannot be opened, read or written."""


class CassetteMiss(CassetteError):
    """A request has no recording in the cassette (replay mode)."""


# --------------------------------------------------------------------------- helpers


def _normalized(body: bytes) -> tuple[Any, bytes]:
    """The parsed body (or None) and its normalized bytes for hashing."""
    if not body:
        return None, b""
    try:
        parsed = json.loads(body)
    except ValueError:
        return None, body
    return parsed, json.dumps(parsed, sort_keys=True, separators=(",", ":")).encode()


def request_key(body: bytes) -> str:
    """The stable hash of a request body (normalized JSON; raw bytes if not JSON)."""
    return hashlib.sha256(_normalized(body)[1]).hexdigest()


def _path(request: httpx2.Request) -> str:
    url = request.url
    return url.path + (f"?{url.query.decode()}" if url.query else "")


def _bearer(request: httpx2.Request) -> str | None:
    auth = request.headers.get("authorization") or ""
    token = auth.split(" ", 1)[1].strip() if " " in auth else auth.strip()
    if len(token) >= 8:
        return token
    key = request.headers.get("api-key") or ""  # Azure-style key header
    return key.strip() if len(key.strip()) >= 8 else None


def _mask(text: str, secret: str | None) -> str:
    return text.replace(secret, _MASK) if secret and secret in text else text


def _prompt_of(body: Any) -> str:
    """The last user prompt of a Chat Completions or Responses request body, as text."""
    if not isinstance(body, dict):
        return ""

    def text_of(content: Any) -> str:
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return " ".join(
                str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in content
            ).strip()
        return "" if content is None else str(content)

    messages = body.get("messages")
    if messages is None:
        messages = body.get("input")
        if isinstance(messages, str):
            return messages
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role", "user") == "user":
                return text_of(message.get("content"))
        if messages and isinstance(messages[-1], dict):
            return text_of(messages[-1].get("content"))
    return ""


def _sse_chunks(data: bytes) -> list[bytes]:
    """A recorded event stream split back into its events (as a server would send them)."""
    parts = data.split(b"\n\n")
    chunks = [p + b"\n\n" for p in parts[:-1]]
    if parts[-1]:
        chunks.append(parts[-1])
    return chunks


class _ReplayStream(httpx2.SyncByteStream, httpx2.AsyncByteStream):
    def __init__(self, chunks: list[bytes], error: str | None, request: httpx2.Request) -> None:
        self._chunks = chunks
        self._error = error
        self._request = request

    def __iter__(self) -> Iterator[bytes]:
        yield from self._chunks
        if self._error:
            raise httpx2.RemoteProtocolError(
                f"{self._error} (replayed from a cassette)", request=self._request
            )

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self:
            yield chunk


class _TeeStream(httpx2.SyncByteStream, httpx2.AsyncByteStream):
    """Passes a response body through unchanged and records it when it ends or closes."""

    def __init__(self, inner: Any, finish: Any) -> None:
        self._inner = inner
        self._finish = finish  # (data: bytes, complete: bool, error: str | None) -> None
        self._parts: list[bytes] = []
        self._done = False

    def _end(self, complete: bool, error: BaseException | None = None) -> None:
        if not self._done:
            self._done = True
            err = f"{type(error).__name__}: {error}" if error is not None else None
            self._finish(b"".join(self._parts), complete, err)

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self._inner:
                self._parts.append(chunk)
                yield chunk
        except httpx2.TransportError as e:
            self._end(False, e)
            raise
        self._end(True)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                self._parts.append(chunk)
                yield chunk
        except httpx2.TransportError as e:
            self._end(False, e)
            raise
        self._end(True)

    def _ended_by_client(self) -> bool:
        # Closed before the end of the body: complete anyway when the stream's final event
        # arrived (openai stops reading at ``data: [DONE]``, whatever follows is nothing).
        return b"".join(self._parts[-2:]).rstrip().endswith(b"data: [DONE]")

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._end(self._ended_by_client())

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._end(self._ended_by_client())


# --------------------------------------------------------------------------- the transport


class Cassette(httpx2.BaseTransport, httpx2.AsyncBaseTransport):
    """An httpx2 transport (sync and async) that records exchanges to a JSONL file or replays them.

    :param path: the cassette file (``.jsonl``).
    :param mode: ``"replay"`` (default), ``"record"`` (starts a new file) or ``"auto"``
        (replay if the file holds an exchange, else record).
    :param inner: the transport requests go to while recording (default: a real
        ``httpx2.HTTPTransport()`` / ``httpx2.AsyncHTTPTransport()``); e.g. a
        :class:`~nbagent._simulator.SimulatedLLM` in tests.
    :param repeat: after every recording of a request was served, serve them again
        from the first (True, default) or raise :class:`CassetteMiss` (False).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        mode: Mode = "replay",
        inner: httpx2.BaseTransport | httpx2.AsyncBaseTransport | None = None,
        *,
        repeat: bool = True,
    ) -> None:
        if mode not in ("replay", "record", "auto"):
            raise CassetteError(
                f"cassette mode {mode!r} is not valid: use 'replay', 'record' or 'auto'."
            )
        self.path = Path(path)
        self.requested_mode: Mode = mode
        self.repeat = repeat
        self.inner = inner
        self._async_inner: httpx2.AsyncBaseTransport | None = None
        self._lock = threading.Lock()
        self._recordings: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        self._queues: dict[tuple[str, str, str], deque[dict[str, Any]]] = {}
        if mode == "auto":
            mode = "replay" if self._has_exchanges() else "record"
        #: "replay" or "record" (what "auto" resolved to)
        self.mode: Literal["replay", "record"] = mode  # type: ignore[assignment]
        if self.mode == "replay":
            self._load()
        else:
            self._start_file()

    def __repr__(self) -> str:
        return f"<nbagent.Cassette {str(self.path)!r} mode={self.mode!r}>"

    # ----------------------------------------------------------------- file

    def _has_exchanges(self) -> bool:
        try:
            with self.path.open("rb") as f:
                return sum(1 for line in f if line.strip()) > 1
        except FileNotFoundError:
            return False

    def _start_file(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            header = {"nbagent_cassette": FORMAT, "created": time.time()}
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(header) + "\n", encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as e:
            raise CassetteError(f"cannot create the cassette {self.path}: {e}") from e

    def _append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        with self._lock:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            except OSError as e:
                raise CassetteError(f"cannot write the cassette {self.path}: {e}") from e
            try:
                with _file_lock(fd):
                    view = memoryview(line)
                    while view:  # one write() in practice; loop for short writes
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)
            finally:
                os.close(fd)

    def _load(self) -> None:
        if not self.path.exists():
            raise CassetteError(
                f"cassette {self.path} does not exist. Record it once with "
                f"cassette_client({str(self.path)!r}, mode='record') and an OPENAI_API_KEY, "
                "or use mode='auto'."
            )
        lines = self.path.read_bytes().splitlines()
        for n, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError as e:
                if n == len(lines):  # a line cut by a crash while recording: skip it
                    continue
                raise CassetteError(f"cassette {self.path} line {n} is not JSON: {e}") from e
            if "nbagent_cassette" in record:
                if record["nbagent_cassette"] > FORMAT:
                    raise CassetteError(
                        f"cassette {self.path} has format {record['nbagent_cassette']}, newer "
                        f"than this nbagent reads ({FORMAT}); upgrade nbagent."
                    )
                continue
            key = (record["method"], record["path"], record["key"])
            self._recordings.setdefault(key, []).append(record)
        self._queues = {k: deque(v) for k, v in self._recordings.items()}

    @property
    def exchanges(self) -> list[dict[str, Any]]:
        """Every recorded exchange in the file, oldest first (re-read from disk)."""
        out = []
        for raw in self.path.read_bytes().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(raw)
                if "nbagent_cassette" not in record:
                    out.append(record)
        return out

    # ----------------------------------------------------------------- transport API

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        body = request.read()
        if self.mode == "replay":
            return self._replay(request, body)
        inner = self.inner if self.inner is not None else self._default_sync()
        if not isinstance(inner, httpx2.BaseTransport):
            raise CassetteError(f"the cassette's inner transport {inner!r} is async-only")
        self._prepare(request)
        t0 = time.perf_counter()
        response = inner.handle_request(request)
        return self._tee(request, body, response, t0)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        body = await request.aread()
        if self.mode == "replay":
            return self._replay(request, body)
        inner = self.inner if self.inner is not None else self._default_async()
        if not isinstance(inner, httpx2.AsyncBaseTransport):
            raise CassetteError(f"the cassette's inner transport {inner!r} is sync-only")
        self._prepare(request)
        t0 = time.perf_counter()
        response = await inner.handle_async_request(request)
        return self._tee(request, body, response, t0)

    def close(self) -> None:
        if isinstance(self.inner, httpx2.BaseTransport):
            self.inner.close()

    async def aclose(self) -> None:
        if self._async_inner is not None:
            await self._async_inner.aclose()
        elif isinstance(self.inner, httpx2.AsyncBaseTransport):
            await self.inner.aclose()

    # ----------------------------------------------------------------- record

    def _default_sync(self) -> httpx2.BaseTransport:
        with self._lock:
            if self.inner is None:
                self.inner = httpx2.HTTPTransport()
        return self.inner  # type: ignore[return-value]

    def _default_async(self) -> httpx2.AsyncBaseTransport:
        with self._lock:
            if self._async_inner is None:
                self._async_inner = httpx2.AsyncHTTPTransport()
        return self._async_inner

    @staticmethod
    def _prepare(request: httpx2.Request) -> None:
        # An uncompressed body is readable in the file and replays byte for byte.
        request.headers["accept-encoding"] = "identity"

    def _tee(
        self, request: httpx2.Request, body: bytes, response: httpx2.Response, t0: float
    ) -> httpx2.Response:
        parsed, _ = _normalized(body)
        secret = _bearer(request)
        safe_headers = {
            k.lower(): _mask(v, secret)
            for k, v in response.headers.items()
            if k.lower() in SAFE_RESPONSE_HEADERS
        }
        base: dict[str, Any] = {
            "method": request.method,
            "path": _path(request),
            "key": request_key(body),
            "request": (
                json.loads(_mask(json.dumps(parsed), secret))
                if parsed is not None
                else _mask(body.decode("utf-8", "replace"), secret)
            ),
            "status": response.status_code,
            "headers": safe_headers,
            "stream": bool(isinstance(parsed, dict) and parsed.get("stream")),
        }

        def finish(data: bytes, complete: bool, error: str | None) -> None:
            record = dict(base)
            encoding = safe_headers.get("content-encoding", "").lower()
            encoded = encoding not in ("", "identity")
            text: str | None = None
            if not encoded:
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError:
                    text = None
            if text is not None and not record["stream"]:
                try:
                    record["json"] = json.loads(_mask(text, secret))
                except ValueError:
                    record["text"] = _mask(text, secret)
            elif text is not None:
                record["text"] = _mask(text, secret)
            else:
                record["b64"] = base64.b64encode(data).decode()
            record["complete"] = complete
            if error:
                record["error"] = _mask(error, secret)
            record["ts"] = time.time()
            record["latency_s"] = round(time.perf_counter() - t0, 6)
            self._append(record)

        if getattr(response, "_content", None) is not None:
            # A body already read by the inner transport (e.g. ``Response(content=...)``):
            # record it now; it is the decoded content, so drop its content-encoding.
            safe_headers.pop("content-encoding", None)
            finish(response.content, True, None)
        else:
            response.stream = _TeeStream(response.stream, finish)
        return response

    # ----------------------------------------------------------------- replay

    def _replay(self, request: httpx2.Request, body: bytes) -> httpx2.Response:
        key = (request.method, _path(request), request_key(body))
        with self._lock:
            queue = self._queues.get(key)
            if not queue and self.repeat and key in self._recordings:
                queue = self._queues[key] = deque(self._recordings[key])
            record = queue.popleft() if queue else None
        if record is None:
            raise CassetteMiss(self._miss_message(request, body, key))
        headers = dict(record.get("headers") or {})
        headers[REPLAY_HEADER] = "replayed"
        if "json" in record:
            data = json.dumps(record["json"]).encode()
        elif "text" in record:
            data = record["text"].encode("utf-8")
        else:
            data = base64.b64decode(record.get("b64", ""))
        if record.get("stream"):
            chunks = _sse_chunks(data)
        else:
            chunks = [data]
            headers.setdefault("content-length", str(len(data)))
        stream = _ReplayStream(chunks, record.get("error"), request)
        return httpx2.Response(record["status"], headers=headers, stream=stream, request=request)

    def _miss_message(self, request: httpx2.Request, body: bytes, key: tuple[str, str, str]) -> str:
        parsed, _ = _normalized(body)
        model = parsed.get("model") if isinstance(parsed, dict) else None
        prompt = " ".join(_prompt_of(parsed).split())
        shown = prompt[:80] + ("..." if len(prompt) > 80 else "")
        lines = [
            f"no recording in cassette {self.path} for {request.method} {key[1]} "
            f"(model {model!r}, prompt {shown!r}).",
        ]
        if key in self._recordings:
            n = len(self._recordings[key])
            lines.append(
                f"Its {n} recording{'s were' if n != 1 else ' was'} already served (repeat=False)."
            )
        else:
            near = self._nearest(key, parsed)
            if near:
                lines.append(near)
        lines.append(
            f"Fix: record it with mode='record' and an OPENAI_API_KEY, e.g. "
            f"cassette_client({str(self.path)!r}, mode='record'), then run the same code again."
        )
        return " ".join(lines)

    def _nearest(self, key: tuple[str, str, str], parsed: Any) -> str | None:
        """Which top-level request fields differ from the closest recording of the same path."""
        if not isinstance(parsed, dict):
            return None
        best: tuple[int, list[str]] | None = None
        for (method, path, _), records in self._recordings.items():
            if (method, path) != key[:2] or not isinstance(records[0].get("request"), dict):
                continue
            other = records[0]["request"]
            differ = sorted(
                k for k in set(parsed) | set(other) if parsed.get(k, _MASK) != other.get(k, _MASK)
            )
            if best is None or len(differ) < best[0]:
                best = (len(differ), differ)
        if best is None:
            return f"The cassette has no recording of {key[0]} {key[1]} at all."
        return f"The closest recording differs in: {', '.join(best[1])}."


@contextlib.contextmanager
def _file_lock(fd: int) -> Iterator[None]:
    """An exclusive lock on an open file (POSIX), so processes append whole lines."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: O_APPEND single writes only
        yield
        return
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- client factory


def cassette_client(
    path: str | os.PathLike[str],
    mode: Mode = "replay",
    *,
    inner: httpx2.BaseTransport | httpx2.AsyncBaseTransport | None = None,
    async_: bool = False,
    repeat: bool = True,
    **openai_kwargs: Any,
) -> Any:
    """A real ``openai.OpenAI`` (``AsyncOpenAI`` with ``async_=True``) over a :class:`Cassette`.

    ``max_retries=0``; when replaying and no ``api_key`` is given or set in
    ``OPENAI_API_KEY``, a dummy key is used (nothing is sent anywhere). Other
    ``openai_kwargs`` (``base_url``, ``timeout``, ...) go to the client.

    To trace the calls too, give the cassette to the traced client instead::

        nbagent.openai_client(http_client=httpx2.Client(transport=Cassette(path)))
    """
    import openai

    if "http_client" in openai_kwargs:
        raise CassetteError(
            "cassette_client() builds its own http_client around the cassette; to use your "
            "own, pass http_client=httpx2.Client(transport=Cassette(...)) to openai.OpenAI."
        )
    cassette = Cassette(path, mode, inner, repeat=repeat)
    options: dict[str, Any] = {"max_retries": 0}
    if cassette.mode == "replay" and not os.environ.get("OPENAI_API_KEY"):
        options["api_key"] = REPLAY_API_KEY
    options.update(openai_kwargs)
    if async_:
        return openai.AsyncOpenAI(http_client=httpx2.AsyncClient(transport=cassette), **options)
    return openai.OpenAI(http_client=httpx2.Client(transport=cassette), **options)
