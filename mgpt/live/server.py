"""The local server: the page's files over HTTP, and one `Session` per WebSocket at /ws.

It binds 127.0.0.1 unless told otherwise. A WebSocket whose Origin is not this server's own
page is refused (403), and so is a request whose Host is not this server's (DNS rebinding):
a page on another site must not be able to drive a musician's local server. At most
`max_sessions` clients play at once; one more is told so in one line and closed; a client that
disconnects frees its session (its worker thread ends). The asyncio loop only reads, checks and
writes messages: every session samples on its own thread.
"""

from __future__ import annotations

import asyncio
import json
import mimetypes
import pathlib
import threading

from websockets.asyncio.server import serve
from websockets.datastructures import Headers
from websockets.http11 import Response

from mgpt.live.session import Session

STATIC = pathlib.Path(__file__).parent / "static"
MAX_MESSAGE_BYTES = 64 * 1024
DEFAULT_MAX_SESSIONS = 4


class Server:
    """`await start()`, then `url`; `sessions` holds the live ones. `run`: a loaded Run."""

    def __init__(self, run, host: str = "127.0.0.1", port: int = 0, max_sessions: int = DEFAULT_MAX_SESSIONS,
                 on_session=None):
        self.run = run
        self.host = host
        self.port = port
        self.max_sessions = max_sessions
        self.sessions: set[Session] = set()
        self.on_session = on_session  # called with each new Session (benchmarks read its stream)
        self._server = None
        self._files = {p.name: p for p in STATIC.iterdir() if p.is_file()}
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"http://{host}:{self.port}/"

    def _own_hosts(self) -> set[str]:
        names = {"127.0.0.1", "localhost", self.host}
        return {f"{n}:{self.port}" for n in names}

    async def start(self) -> None:
        self._server = await serve(self._handle, self.host, self.port, process_request=self._http,
                                   max_size=MAX_MESSAGE_BYTES, max_queue=64, compression=None)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for s in list(self.sessions):
            s.close()

    def _http(self, connection, request):
        """Static files, and the checks a WebSocket must pass before its handshake."""
        host = request.headers.get("Host", "")
        if host not in self._own_hosts():
            return connection.respond(403, f"Host {host!r} is not this server\n")
        path = request.path.split("?", 1)[0]
        if path == "/ws":
            origin = request.headers.get("Origin")
            # Browsers always send Origin on a WebSocket; a client without one is not a web page.
            if origin is not None and origin not in {f"http://{h}" for h in self._own_hosts()}:
                return connection.respond(403, f"Origin {origin!r} may not connect to this server\n")
            return None
        if path == "/favicon.ico":
            return connection.respond(204, "")
        name = "index.html" if path == "/" else path.lstrip("/").removeprefix("static/")
        file = self._files.get(name)
        if file is None:
            return connection.respond(404, "Not found\n")
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        headers = Headers([("Content-Type", f"{kind}; charset=utf-8" if kind.startswith("text/") or kind.endswith(
            "javascript") else kind), ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")])
        return Response(200, "OK", headers, file.read_bytes())

    async def _handle(self, connection) -> None:
        loop = asyncio.get_running_loop()
        outbox: asyncio.Queue = asyncio.Queue()

        def send(msg: dict) -> None:  # from any thread
            loop.call_soon_threadsafe(outbox.put_nowait, json.dumps(msg))

        with self._lock:
            full = len(self.sessions) >= self.max_sessions
            session = None if full else Session(self.run, send)
            if session is not None:
                self.sessions.add(session)
        if session is None:
            await connection.send(json.dumps({"type": "error", "line": f"this server already has {self.max_sessions} "
                                                                        "players; try again when one leaves"}))
            await connection.close(1013, "too many sessions")
            return

        async def pump():
            while True:
                await connection.send(await outbox.get())

        sender = asyncio.create_task(pump())
        try:
            session.start()
            if self.on_session:
                self.on_session(session)
            async for raw in connection:
                session.receive(raw)
        except Exception:  # a dropped connection ends its session like a closed one
            pass
        finally:
            session.close()
            with self._lock:
                self.sessions.discard(session)
            sender.cancel()
            await asyncio.get_running_loop().run_in_executor(None, session.join, 5)


class Background:
    """A Server on an event loop in a thread of its own (tests, benchmarks, the MIDI-port bridge)."""

    def __init__(self, run, **kwargs):
        self.server = Server(run, **kwargs)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="mgpt-live-server")

    def __enter__(self) -> Server:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(30)
        return self.server

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
