"""Full-duplex HTTP/1.1 POST for /score/stream: the response is read while the body is still sent.

httpx (httpcore under it) writes a request's whole body before it reads any of the response, so a
stream's results would only come back once its input ended. HTTP/1.1 lets a server answer while
the request body is still arriving, and the teacher does. Here a task sends the body in chunked
encoding while the caller reads the response through h11, so each result reaches the caller as soon
as it is scored. The sync form runs the same code on an event loop of its own, in a thread.

    async with open_stream_async(url, "/score/stream", headers, frames, timeout=120) as response:
        if response.status_code >= 400:
            await response.aread()                   # an httpx.Response, for the error body
        async for chunk in response.aiter_bytes(): ...

Plain HTTP/1.1 over TCP or TLS (asyncio's), one request per connection, no proxy from the
environment: what the teacher and a load balancer in front of it need. `timeout` is the longest
silence from the server while the body is not waiting for the caller's next item: a server that
hangs is noticed at the latest once the caller's input has ended.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ssl
import threading
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager

import h11
import httpx

from shared.loop_thread import LoopThread

_READ = 65536
_POLL_S = 0.2
_LAST_CHUNK = b"0\r\n\r\n"
_END = object()  # the end of the caller's body (None could be an item)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


class _Exchange:
    """One request's h11 state: its head, then the response as received bytes complete it."""

    def __init__(self, url: str, path: str, headers: dict):
        self.url = httpx.URL(url.rstrip("/") + path)
        if self.url.scheme not in ("http", "https") or not self.url.host:
            raise httpx.UnsupportedProtocol(f"not an http(s) URL: {url!r}")
        self.port = self.url.port or (443 if self.url.scheme == "https" else 80)
        # The trust store httpx uses for the other routes, so both agree about a certificate.
        self.tls = httpx.create_ssl_context() if self.url.scheme == "https" else None
        self._conn = h11.Connection(h11.CLIENT)
        fields = [("Host", self.url.netloc.decode()), ("Transfer-Encoding", "chunked")]
        self.head = self._conn.send(
            h11.Request(
                method="POST", target=self.url.raw_path, headers=fields + list(headers.items())
            )
        )
        self.status_code = 0
        self.headers = httpx.Headers()
        self.ended = False  # the whole response has arrived

    def receive(self, data: bytes) -> list[bytes]:
        """Feed bytes from the server (b"" when it closed); the body chunks they complete."""
        try:
            self._conn.receive_data(data)
            chunks = []
            while not self.ended and (event := self._conn.next_event()) is not h11.NEED_DATA:
                if isinstance(event, h11.Response):
                    self.status_code = event.status_code
                    self.headers = httpx.Headers(
                        [(k.decode(), v.decode()) for k, v in event.headers]
                    )
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    self.ended = True
                elif isinstance(event, h11.ConnectionClosed):
                    raise httpx.RemoteProtocolError(f"{self.url} closed the stream mid-response")
        except h11.RemoteProtocolError as exc:
            raise httpx.RemoteProtocolError(f"{self.url}: {exc}") from exc
        return chunks

    def as_httpx(self, body: bytes) -> httpx.Response:
        """The finished response in httpx's form, for the clients' error handling."""
        request = httpx.Request("POST", self.url)
        return httpx.Response(self.status_code, headers=self.headers, content=body, request=request)


class _Sender:
    """What the body's sender tells the reader: whether it waits for the caller, and what the
    caller's iterable raised, if it did (re-raised to the caller, whatever its type: an OSError
    reading the caller's own files is not the connection's)."""

    def __init__(self):
        self.waiting_for_caller = False
        self.error: BaseException | None = None

    def raise_caller_error(self) -> None:
        if self.error is not None:
            raise self.error


class AsyncStreamResponse:
    """A response being received: status and headers first, then the body as it arrives."""

    def __init__(self, exchange: _Exchange, receive):
        self._exchange = exchange
        self._receive = receive  # async () -> list[bytes]
        self._chunks: list[bytes] = []

    async def _start(self) -> None:
        while not self._exchange.status_code:
            self._chunks += await self._receive()

    @property
    def status_code(self) -> int:
        return self._exchange.status_code

    @property
    def headers(self) -> httpx.Headers:
        return self._exchange.headers

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        while True:
            while self._chunks:  # taken as yielded: a later call goes on where this one stopped
                yield self._chunks.pop(0)
            if self._exchange.ended:
                return
            self._chunks = await self._receive()

    async def aread(self) -> httpx.Response:
        return self._exchange.as_httpx(b"".join([chunk async for chunk in self.aiter_bytes()]))


@asynccontextmanager
async def open_stream_async(
    url: str,
    path: str,
    headers: dict,
    body: AsyncIterable[bytes],
    timeout: float,
    connect_timeout: float | None = None,
) -> AsyncIterator[AsyncStreamResponse]:
    """POST `body`, each item sent as it comes (iterated in a task of its own), and give the
    response while the body is still going out. Connection trouble raises httpx.TransportError
    subclasses; an error raised by `body` itself is re-raised here. Connecting may take
    `connect_timeout` seconds (default: `timeout`)."""
    exchange = _Exchange(url, path, headers)
    connect_s = timeout if connect_timeout is None else connect_timeout
    reader, writer = await _connect(url, exchange, connect_s)
    sender = _Sender()
    task = asyncio.create_task(_send(writer, exchange.head, body, sender))
    try:
        response = AsyncStreamResponse(exchange, _receiver(url, reader, exchange, sender, timeout))
        await response._start()
        yield response
        sender.raise_caller_error()
    finally:
        task.cancel()
        writer.transport.abort()
        await asyncio.gather(task, return_exceptions=True)


async def _connect(
    url: str, exchange: _Exchange, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        return await asyncio.wait_for(
            asyncio.open_connection(
                exchange.url.host,
                exchange.port,
                ssl=exchange.tls,
                server_hostname=exchange.url.host if exchange.tls else None,
            ),
            timeout,
        )
    except asyncio.TimeoutError as exc:
        raise httpx.ConnectTimeout(f"{url}: no connection within the timeout") from exc
    except (OSError, ssl.SSLError) as exc:
        raise httpx.ConnectError(f"{url}: {type(exc).__name__} {exc}") from exc


async def _send(
    writer: asyncio.StreamWriter, head: bytes, body: AsyncIterable[bytes], sender: _Sender
) -> None:
    """Write the request head, then each body item as a chunk as it comes. On an error the
    connection is dropped: the reader then meets the connection's error, or raises the body's."""
    try:
        writer.write(head)
        iterator = aiter(body)
        while (data := await _caller_item(iterator, sender)) is not _END:
            if data:
                writer.write(_chunk(data))
                await writer.drain()
        writer.write(_LAST_CHUNK)
        await writer.drain()
    except BaseException:  # noqa: BLE001 - the caller's error is kept for the reader to raise
        writer.transport.abort()


async def _caller_item(iterator: AsyncIterator, sender: _Sender):
    """The caller's next body item (or _END), with what its iterable raises kept in `sender`."""
    sender.waiting_for_caller = True
    try:
        data = await anext(iterator, _END)
        if data is not _END and not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"a request body item must be bytes, not {type(data).__name__}")
        return data
    except asyncio.CancelledError:  # the stream is over: nothing to tell the caller
        raise
    except BaseException as exc:
        sender.error = exc
        raise
    finally:
        sender.waiting_for_caller = False


def _receiver(
    url: str,
    reader: asyncio.StreamReader,
    exchange: _Exchange,
    sender: _Sender,
    timeout: float,
) -> Callable[[], Awaitable[list[bytes]]]:
    """The response's next-chunks call: it reads until bytes come, raising ReadTimeout after
    `timeout` s of silence (not counting time the body waited on its caller)."""

    async def receive() -> list[bytes]:
        silent = 0.0
        while True:
            try:
                # Cancelling a pending StreamReader.read on timeout loses no data.
                data = await asyncio.wait_for(reader.read(_READ), _POLL_S)
            except asyncio.TimeoutError:
                sender.raise_caller_error()
                silent = 0.0 if sender.waiting_for_caller else silent + _POLL_S
                if silent > timeout:
                    raise httpx.ReadTimeout(f"{url} sent nothing for {timeout} s") from None
                continue
            except OSError as exc:
                sender.raise_caller_error()
                raise httpx.ReadError(f"{url}: {exc}") from exc
            if not data:
                sender.raise_caller_error()
            return exchange.receive(data)

    return receive


class StreamResponse:
    """Sync form of AsyncStreamResponse: each call waits on the stream's own event loop."""

    def __init__(self, response: AsyncStreamResponse, call):
        self._response = response
        self._call = call  # run a coroutine on the stream's loop and wait for its result

    @property
    def status_code(self) -> int:
        return self._response.status_code

    @property
    def headers(self) -> httpx.Headers:
        return self._response.headers

    def iter_bytes(self) -> Iterator[bytes]:
        chunks = self._response.aiter_bytes()

        async def next_chunk() -> bytes | None:
            return await anext(chunks, None)

        while (chunk := self._call(next_chunk())) is not None:
            yield chunk

    def read(self) -> httpx.Response:
        return self._call(self._response.aread())


@contextmanager
def open_stream(
    url: str,
    path: str,
    headers: dict,
    body: Iterable[bytes],
    timeout: float,
    connect_timeout: float | None = None,
) -> Iterator[StreamResponse]:
    """Sync form of open_stream_async, on an event loop of its own in a thread; `body` is read in
    a daemon thread, so a `body` that blocks forever after the stream ended cannot keep the process
    from exiting."""
    runner = LoopThread("stream-loop")
    call = runner.call
    stream = open_stream_async(
        url, path, headers, _read_in_a_thread(body, runner.loop), timeout, connect_timeout
    )
    try:
        response = call(stream.__aenter__())
        try:
            yield StreamResponse(response, call)
        except BaseException as exc:
            if not call(stream.__aexit__(type(exc), exc, exc.__traceback__)):
                raise
        else:
            call(stream.__aexit__(None, None, None))
    finally:
        runner.close()


async def _read_in_a_thread(body: Iterable[bytes], loop) -> AsyncIterator[bytes]:
    """`body`'s items, read by a daemon thread (started on the first item asked for), one ahead."""
    items: asyncio.Queue = asyncio.Queue(maxsize=1)

    def read() -> None:
        try:
            for item in body:
                if not _hand_over(items, item, loop, wait=True):
                    return  # the stream is over: nobody reads the rest
            outcome = _END
        except BaseException as exc:  # noqa: BLE001 - raised where the body is read
            outcome = exc
        _hand_over(items, outcome, loop, wait=False)

    threading.Thread(target=read, daemon=True, name="stream-body").start()
    while (item := await items.get()) is not _END:
        if isinstance(item, BaseException):
            raise item
        yield item


def _put_on_the_loop(items: asyncio.Queue, item) -> None:
    if items.full():  # the body's last item is still waiting: queue behind it
        asyncio.ensure_future(items.put(item))
    else:
        items.put_nowait(item)


def _hand_over(items: asyncio.Queue, item, loop, wait: bool) -> bool:
    """Put `item` on the stream's queue from the reading thread (waiting until it is taken if
    `wait`); False once the stream is over and its loop gone or its put cancelled."""
    if not wait:
        # The put is made on the loop, when it gets there, and without a coroutine while there is
        # room: a put task made as the stream's loop stops would never run (and be warned about).
        try:
            loop.call_soon_threadsafe(_put_on_the_loop, items, item)
        except RuntimeError:  # the loop is closed
            return False
        return True
    put = items.put(item)
    try:
        sent = asyncio.run_coroutine_threadsafe(put, loop)
    except RuntimeError:  # the loop is closed
        put.close()  # never to run: no "never awaited" warning
        return False
    while True:
        try:
            sent.result(timeout=_POLL_S)
            return True
        except concurrent.futures.CancelledError:
            return False
        except concurrent.futures.TimeoutError:  # the stream's reader is slow, or gone
            if not loop.is_running():  # stopped before it ran the put: no one ever will
                put.close()  # never to run: no "never awaited" warning
                return False
