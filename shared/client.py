"""Clients of the teacher server: `TeacherClient` (sync) and `AsyncTeacherClient` (asyncio), on httpx
(and, for the full-duplex /score/stream, on shared.duplex).

    client = TeacherClient(["http://127.0.0.1:8000", "http://127.0.0.1:8001"])
    client.connect(tokenizer)            # refuses a teacher whose tokenizer differs from the student's
    result = client.score([(prompt_ids, completion_ids)], top_k=5)
    result.results[0].logprobs           # float32 [n]

Each route has a method of the same name and arguments. Requests go binary (msgpack) by default, to
the replica with the fewest requests in flight; connection errors, 429, 503 (and a load balancer's
502/504) are retried with
exponential backoff (honouring Retry-After), on another replica when there is one. Scoring is a pure
function of the request, so a retry can never score anything twice.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import threading
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import contextmanager
from typing import Any

import httpx

from shared.duplex import open_stream, open_stream_async
from shared.errors import (
    FingerprintMismatch,
    MalformedBody,
    NotFound,
    NotReady,
    ServerError,
    TeacherError,
    Unauthorized,
    error_from_body,
)
from shared.fingerprint import tokenizer_fingerprint
from shared.protocol import (
    FINGERPRINT_HEADER,
    FRAMES,
    JSON,
    MSGPACK,
    FrameReader,
    ScoreRequest,
    ScoreResult,
    StreamItem,
    decode_response,
    decode_stream_item,
    encode_request,
    encode_request_frame,
    validate_request,
)

# Overloaded, loading, or a load balancer whose upstream just went away: all worth retrying.
RETRY_STATUSES = (429, 502, 503, 504)
# How long a replica that failed is passed over (the client's own marks: at most max_backoff);
# each failure in a row doubles it, up to MAX_SIT_OUT_S, so a replica that stays dead (or hangs)
# does not get a share of every step's work again.
SIT_OUT_S = 2.0
MAX_SIT_OUT_S = 60.0
# The limits a teacher's /info must state, so a caller can check its requests fit before sending.
INFO_LIMITS = ("max_seq_len", "max_top_k", "vocab_size")
# Connecting takes milliseconds; a replica whose host is gone (packets dropped, no refusal) should
# not cost the whole request timeout on each attempt.
CONNECT_TIMEOUT_S = 10.0


class TeacherUnreachable(TeacherError, ConnectionError):
    """No replica answered within the retry budget."""

    type = "teacher_unreachable"


class TeacherTimedOut(TeacherUnreachable):
    """A replica took the request and sent no answer within the client's `timeout`."""


class _Replicas:
    """Least-in-flight choice among replicas; a replica that refused a connection sits out a while."""

    def __init__(self, urls: Sequence[str]):
        if not urls:
            raise ValueError("at least one teacher URL is needed")
        self.urls = [checked_url(u) for u in urls]
        self.in_flight = dict.fromkeys(self.urls, 0)
        self.down_until = dict.fromkeys(self.urls, 0.0)
        self.failures = dict.fromkeys(self.urls, 0)  # in a row, since it last answered
        self.failed_at = dict.fromkeys(self.urls, float("-inf"))  # monotonic time of the last
        self._turn = itertools.count()
        self._lock = threading.Lock()

    def is_up(self, url: str) -> bool:
        """False while `url` sits out after a failure (a URL outside the pool never does)."""
        return self.down_until.get(url, 0.0) <= time.monotonic()

    def acquire(self) -> str:
        with self._lock:
            up = [u for u in self.urls if self.is_up(u)] or self.urls
            # Rotate the starting point so ties spread evenly instead of always hitting the first.
            start = next(self._turn) % len(up)
            rotated = up[start:] + up[:start]
            url = min(rotated, key=lambda u: self.in_flight[u])
            self.in_flight[url] += 1
            return url

    def release(self, url: str) -> None:
        with self._lock:
            self.in_flight[url] -= 1

    def mark_down(self, url: str, seconds: float) -> None:
        """`url` failed: it sits out `seconds`, doubled for each failure in a row. A failure seen
        while it already sits out is the same incident (the other requests it held, or a second
        report of one broken stream), so it does not lengthen the span."""
        with self._lock:
            if url not in self.failures or not self.is_up(url):  # not one of ours, or sitting out
                return
            self.failures[url] += 1
            self.failed_at[url] = time.monotonic()
            growth = 2 ** min(self.failures[url] - 1, 16)
            self.down_until[url] = time.monotonic() + min(MAX_SIT_OUT_S, seconds * growth)

    def mark_good(self, url: str, asked_at: float = float("inf")) -> None:
        """`url` answered what it was asked at `asked_at` (monotonic time): it is up, and its next
        failure sits out the first span again (a replica that answered 503 while it loaded is up
        once it answers); a failure reported since it was asked is not forgiven (a stream's late
        first answer, from a replica given up on meanwhile for being too slow)."""
        with self._lock:
            if url in self.failures and self.failed_at[url] <= asked_at:
                self.failures[url] = 0
                self.down_until[url] = 0.0


def checked_api_key(api_key: str) -> str:
    """`api_key` as it can go in a header: one with a space or a control character (a key read
    from a file with its newline) is refused at once, rather than failing every request as if
    the teacher were unreachable."""
    if not all("!" <= c <= "~" for c in api_key):
        raise ValueError(
            "an API key may hold only visible ASCII characters (no spaces or newlines: strip a "
            "key read from a file)"
        )
    return api_key


def checked_url(url: str) -> str:
    """`url` without a trailing slash; one that is not http(s)://host[:port] is refused at once
    (retrying it could never help) with a ValueError that says why."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ValueError(f"teacher URL {url!r} is not a URL ({exc})") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"teacher URL {url!r}: expected http(s)://host[:port], with a host")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise ValueError(f"teacher URL {url!r}: port {parsed.port} out of range 1-65535")
    if parsed.userinfo:  # not echoed: it may be a password
        raise ValueError(
            "a teacher URL may not hold a user name or password (a run keeps its URLs in "
            "config.json and its logs): give the teacher's key as the API key"
        )
    return url.rstrip("/")


class _Core:
    """What the sync and async clients share: requests, retry decisions, replies."""

    def __init__(
        self,
        base_urls: str | Sequence[str],
        api_key: str | None,
        binary: bool,
        timeout: float,
        max_retries: int,
        backoff: float,
        max_backoff: float,
        connect_timeout: float,
    ):
        self.replicas = _Replicas([base_urls] if isinstance(base_urls, str) else list(base_urls))
        self.binary = binary
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, not {max_retries!r}")
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.headers = {"Authorization": f"Bearer {checked_api_key(api_key)}"} if api_key else {}
        # The tokenizer connect() checked the replicas against; every answer after it is held to
        # it too, since behind a balancer connect() meets only one replica, and one may change.
        self.fingerprint: str | None = None

    def score_body(self, sequences, top_k, candidate_ids, temperature, max_positions):
        """(body, headers, the request) of a /score call."""
        request = as_request(
            {
                "sequences": sequences,
                "top_k": top_k,
                "candidate_ids": candidate_ids,
                "temperature": temperature,
                "max_positions": max_positions,
            }
        )
        ctype = MSGPACK if self.binary else JSON
        headers = {**self.headers, "Content-Type": ctype, "Accept": ctype}
        return encode_request(request, self.binary), headers, request

    def score_result(self, response: httpx.Response, request: ScoreRequest) -> ScoreResult:
        """The /score answer to `request`: a result of the shape asked for each sequence, or a
        TeacherError (an answer off by a position would train on misaligned scores)."""
        result = decode_response(response.content, self.binary)
        where = response.request.url
        self.check_answer(str(where), result.tokenizer_fingerprint)
        sent = len(request.sequences)
        if len(result.results) != sent:
            raise TeacherError(
                f"the teacher at {where} answered {len(result.results)} of the {sent} sequences "
                "sent"
            )
        for i, score in enumerate(result.results):
            if problem := _shape_problem(score, request, i):
                raise TeacherError(f"the teacher at {where} answered sequence {i} {problem}")
        return result

    def stream_headers(self) -> dict:
        return {**self.headers, "Content-Type": FRAMES, "Accept": FRAMES}

    def sit_out(self, url: str) -> None:
        """Pass over a replica that failed for a while, so the next tries go to the others."""
        self.replicas.mark_down(url, min(self.max_backoff, SIT_OUT_S))

    def stream_failure(self, url: str, exc: httpx.TransportError) -> TeacherError:
        """The error a broken stream raises; a replica it never reached sits out a while."""
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            # Only then: one stream that broke is not its replica, nor a balanced URL's pool,
            # down (the caller that knows, as the trainer's feed, may sit it out).
            self.sit_out(url)
            return TeacherUnreachable(f"teacher at {url} is unreachable ({exc})")
        if isinstance(exc, httpx.ReadTimeout):
            return TeacherTimedOut(f"the stream from {url} sent nothing for {self.timeout:g} s")
        return ServerError(f"the stream from {url} broke: {type(exc).__name__}: {exc}")

    def delay_after_error(
        self,
        attempt: int,
        url: str,
        exc: httpx.TransportError,
        max_retries: int | None = None,
        pinned: bool = False,
    ) -> float:
        """Seconds to wait before trying again after a transport error, or the error to raise."""
        if isinstance(exc, httpx.PoolTimeout):  # our own pool is full: no replica's fault
            raise TeacherUnreachable(
                f"no free connection to {url} within {self.timeout:g} s (too many requests in "
                "flight from this client)"
            ) from exc
        if isinstance(exc, httpx.ReadTimeout):
            # The replica took the request and is still at it: sending it again would only add
            # the same work to a busy replica.
            raise TeacherTimedOut(
                f"teacher at {url} did not answer within {self.timeout:g} s (not retried: it may "
                "still be working on it; a longer client timeout gives requests this large time)"
            ) from exc
        self.sit_out(url)
        if attempt >= (self.max_retries if max_retries is None else max_retries):
            raise TeacherUnreachable(
                f"teacher at {url} is unreachable after {attempt + 1} attempts "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        return self._wait_before_retry(url, pinned, self._backoff(attempt))

    def delay_after_response(
        self,
        attempt: int,
        url: str,
        response: httpx.Response,
        max_retries: int | None = None,
        pinned: bool = False,
    ) -> float | None:
        """None when the response is final (success or an error to raise); else seconds to wait.
        A replica that is busy or loading sits out its Retry-After (or the first span), so the
        retry, and the requests after it, go to another replica at once when one is up."""
        if response.status_code not in RETRY_STATUSES:
            return None
        retry_after = _retry_after(response)  # honoured, up to our own longest backoff
        wait = (
            min(retry_after, self.max_backoff)
            if retry_after is not None
            else self._backoff(attempt)
        )
        self.replicas.mark_down(url, wait or SIT_OUT_S)
        if attempt >= (self.max_retries if max_retries is None else max_retries):
            return None
        return self._wait_before_retry(url, pinned, wait)

    def _wait_before_retry(self, url: str, pinned: bool, wait: float) -> float:
        """With another replica up (and the request free to go there), go at once; else `wait`."""
        others_up = any(self.replicas.is_up(u) for u in self.replicas.urls if u != url)
        return 0.0 if others_up and not pinned else wait

    def final_reply(self, url: str, response: httpx.Response) -> Any:
        """The response not to be retried: `url` answered, if only to refuse (a 5xx, or a 429 or
        503 whose retries ran out, aside: its sit-out stands), so its failures so far are
        forgiven; then the reply, or the error it says (a server's fault names the replica)."""
        if response.status_code < 500 and response.status_code not in RETRY_STATUSES:
            self.replicas.mark_good(url)
        try:
            return self.reply(response)
        except TeacherError as exc:
            if response.status_code >= 500 and url not in exc.message:
                raise _at(url, exc) from None
            raise

    def reply(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            where = f"{response.request.method} {response.request.url}"
            try:
                body = response.json()
            except ValueError:  # not a teacher's error body (a proxy, another server): no page dump
                message = f"HTTP {response.status_code} from {where}"
                if response.headers.get("content-type", "").startswith("text/plain"):
                    message += f": {' '.join(response.text.split())[:200]}"
                body = {"error": {"message": message}}
            err = error_from_body(response.status_code, body, _retry_after(response))
            if response.status_code == 404 and err.param is None and where not in err.message:
                # No such route: most often a URL with a path after the teacher's address.
                err = NotFound(f"{err.message}: {where} (is the URL the teacher's base URL?)")
            raise err
        return response

    def check_info(self, url: str, info: dict, expected: str | None) -> None:
        """connect()'s check of one replica: its tokenizer is `expected` (the student's) or, with
        none given, the first replica's; the one it has is pinned for every answer after."""
        got = info.get("tokenizer_fingerprint")
        if expected is not None and got != expected:
            raise FingerprintMismatch(
                f"teacher at {url} uses another tokenizer (fingerprint {got}) than the student "
                f"({expected}); its token ids would mean other text, so refusing to use it"
            )
        self.check_answer(url, got)
        self.fingerprint = got

    def check_answer(self, url: str, fingerprint: str | None) -> None:
        """An answer from a replica whose tokenizer is not the one connect() pinned (one that
        joined or changed behind `url` since) is refused, not used. An answer that names none
        (a stream from a server that sends no fingerprint header) is not checked."""
        if None not in (self.fingerprint, fingerprint) and fingerprint != self.fingerprint:
            raise FingerprintMismatch(
                f"teacher at {url} answered with another tokenizer (fingerprint {fingerprint}) "
                f"than connect() found ({self.fingerprint}): a replica changed or joined behind "
                "it? Its token ids would mean other text, so its answer is refused"
            )

    def _backoff(self, attempt: int) -> float:
        # The exponent is capped: 2.0 ** 1024 overflows, and the wait is max_backoff long before.
        return min(self.max_backoff, self.backoff * 2.0 ** min(attempt, 60)) * (
            0.5 + random.random() / 2
        )


class _StreamReader:
    """One /score/stream call's two sides: counts the frames it sends, decodes the result frames,
    whatever the chunking, and checks at the end that the done frame came (without it, the
    teacher's side was cut off) and answered every frame sent. `on_first_score` runs once, when the
    first sequence's score arrives (the replica answered: its failures so far are forgiven)."""

    def __init__(self, url: str, on_first_score: Callable[[], None]):
        self.url = url
        self.sent = 0  # frames sent so far
        self._frames = FrameReader(2**31)
        self._done: StreamItem | None = None
        self._on_first_score: Callable[[], None] | None = on_first_score
        # Each frame not wholly answered yet: its request, and its sequences still owed an answer
        # (each answer is held to its request's shape, as /score's are).
        self._asked: dict[int, tuple[ScoreRequest, int]] = {}

    def frame(self, request: ScoreRequest | dict) -> bytes:
        """`request` as the next frame to send, counted."""
        request = as_request(request)
        data = encode_request_frame(request)
        self._asked[self.sent] = (request, len(request.sequences))
        self.sent += 1
        return data

    def feed(self, chunk: bytes) -> list[StreamItem]:
        with self._framing():
            payloads = self._frames.feed(chunk)
        items = [decode_stream_item(payload) for payload in payloads]
        for item in items:
            self._check(item)
        self._done = self._done or next((item for item in items if item.done), None)
        if self._on_first_score and any(item.score is not None for item in items):
            # Here, not at the end: a caller may stop reading at the done frame.
            self._on_first_score()
            self._on_first_score = None
        return items

    def _check(self, item: StreamItem) -> None:
        """An answer to a frame and a sequence that were sent, in the shape asked for; else the
        teacher's fault (a ServerError: a score on the wrong rollout, or of the wrong shape, would
        be trained on)."""
        if item.done:
            return
        if item.frame not in self._asked:
            raise ServerError(f"the teacher at {self.url} answered frame {item.frame}, not open")
        request, owed = self._asked[item.frame]
        if item.index is None:  # the whole frame refused
            del self._asked[item.frame]
            return
        if not 0 <= item.index < len(request.sequences):
            raise ServerError(
                f"the teacher at {self.url} answered sequence {item.index} of frame {item.frame}, "
                f"which has {len(request.sequences)}"
            )
        if item.score is not None and (problem := _shape_problem(item.score, request, item.index)):
            raise ServerError(
                f"the teacher at {self.url} answered sequence {item.index} of frame {item.frame} "
                f"{problem}"
            )
        if owed > 1:
            self._asked[item.frame] = (request, owed - 1)
        else:
            del self._asked[item.frame]

    def finish(self) -> None:
        if self._done is None:  # cut off, inside a frame or between two
            raise ServerError(f"the stream from {self.url} ended without its done frame")
        with self._framing():
            self._frames.finish()
        if (self._done.frames or 0) < self.sent:  # frames the teacher never read as frames
            raise ServerError(
                f"the teacher at {self.url} answered {self._done.frames} of the {self.sent} "
                "frames sent; the rest got no result"
            )
        if self._asked:  # read as frames, but not every sequence of theirs answered
            raise ServerError(
                f"the teacher at {self.url} ended its stream with frames {sorted(self._asked)} "
                "not wholly answered"
            )

    @contextmanager
    def _framing(self) -> Iterator[None]:
        """Broken framing in the teacher's answer is the teacher's fault (a ServerError), not the
        MalformedBody a caller's own bad body gets."""
        try:
            yield
        except MalformedBody as exc:
            raise ServerError(f"the stream from {self.url} is broken: {exc.message}") from None


def _refuse_if_closed(http: httpx.Client | httpx.AsyncClient) -> None:
    """A stream has its own connection; a closed client refuses it as httpx refuses the others."""
    if http.is_closed:
        raise RuntimeError("Cannot send a request, as the client has been closed.")


def as_request(item: ScoreRequest | dict) -> ScoreRequest:
    """A ScoreRequest from itself or from score()'s keyword arguments; a bad field raises
    InvalidRequest naming it, as the server would answer it."""
    if isinstance(item, ScoreRequest):
        return item
    if not isinstance(item, Mapping):
        raise TypeError(
            "a request is a ScoreRequest or a dict of its fields ({'sequences': [...], ...}), "
            f"not {type(item).__name__}"
        )
    sequences = item.get("sequences")
    if isinstance(sequences, Iterable) and not isinstance(sequences, (str, bytes, Mapping)):
        item = {**item, "sequences": [_as_sequence(s) for s in sequences]}
    return validate_request(item)


def _as_sequence(item: Any) -> Any:
    """A (prompt_ids, completion_ids) pair or an object with those fields as the wire's dict;
    anything else is left for validation to name."""
    if hasattr(item, "prompt_ids") and hasattr(item, "completion_ids"):
        item = (item.prompt_ids, item.completion_ids)
    if isinstance(item, (list, tuple)) and len(item) == 2 and all(map(_is_ids, item)):
        return {"prompt_ids": list(item[0]), "completion_ids": list(item[1])}
    return item


def _is_ids(value: Any) -> bool:
    return hasattr(value, "__iter__") and not isinstance(value, (str, bytes, dict))


def _info_of(url: str, response: httpx.Response) -> dict:
    """A replica's /info, or an error that says `url` is not a teacher."""
    try:
        info = response.json()
    except ValueError:
        info = None
    if not isinstance(info, dict) or "tokenizer_fingerprint" not in info:
        raise TeacherError(f"{url} is not an OPD teacher: GET /info did not answer its JSON")
    missing = [key for key in INFO_LIMITS if not isinstance(info.get(key), int)]
    if missing:  # a trainer checks its settings against them before any work
        raise TeacherError(f"{url} is not an OPD teacher: its /info gives no {', '.join(missing)}")
    return info


def _shape_problem(score, request: ScoreRequest, i: int) -> str | None:
    """How sequence `i`'s score differs from the shape `request` asks for, if it does."""
    n = request.scored_positions(i)
    if len(score.logprobs) != n:
        return f"with {len(score.logprobs)} log-probs for its {n} scored positions"
    if request.top_k and (score.topk_ids is None or score.topk_ids.shape != (n, request.top_k)):
        got = None if score.topk_ids is None else score.topk_ids.shape
        return f"with top-k ids of shape {got}, not ({n}, {request.top_k})"
    if request.candidate_ids is not None and (
        score.candidate_logprobs is None
        or [len(c) for c in score.candidate_logprobs]
        != [len(row) for row in request.candidate_ids[i][:n]]
    ):
        return "with candidate log-probs that do not match the candidate ids sent"
    return None


def _json_of(response: httpx.Response) -> dict:
    """A teacher's small JSON answer (/health, /ready); a page from another server is a
    TeacherError saying so, not a JSONDecodeError."""
    try:
        return response.json()
    except ValueError:
        raise TeacherError(
            f"{response.request.method} {response.request.url} did not answer JSON: not an OPD "
            "teacher?"
        ) from None


def _undecodable(url: str, exc: httpx.DecodingError) -> TeacherError:
    return ServerError(f"teacher at {url} sent an answer that cannot be decoded ({exc})")


def _at(url: str, exc: TeacherError) -> TeacherError:
    """The same error, saying which replica answered it."""
    return type(exc)(f"teacher at {url}: {exc.message}", exc.param, exc.retry_after)


def _not_a_teacher(url: str, exc: NotFound) -> TeacherError:
    return TeacherError(f"{url} is not an OPD teacher (wrong URL or port?): {exc}")


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds; None when absent or not a usable number (an HTTP date, "nan", -1:
    the client's own backoff is used instead)."""
    try:
        seconds = float(response.headers.get("retry-after", ""))
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _expected_fingerprint(tokenizer: Any) -> str | None:
    if isinstance(tokenizer, str) and not tokenizer.startswith("sha256:"):
        raise ValueError(
            f"connect() takes a tokenizer or its fingerprint ('sha256:...'), not {tokenizer!r}: "
            "load the tokenizer first (opd.models.load_tokenizer)"
        )
    if tokenizer is None or isinstance(tokenizer, str):
        return tokenizer
    return tokenizer_fingerprint(tokenizer)


class _ClientBase:
    """What both clients share and do without I/O: their settings and the replicas' state. Each
    subclass names its httpx client class and does its own requests."""

    _http_class: type = httpx.Client

    def __init__(
        self,
        base_urls: str | Sequence[str],
        api_key: str | None = None,
        binary: bool = True,
        timeout: float = 120.0,
        max_retries: int = 6,
        backoff: float = 0.25,
        max_backoff: float = 8.0,
        connect_timeout: float = CONNECT_TIMEOUT_S,
    ):
        self._core = _Core(
            base_urls, api_key, binary, timeout, max_retries, backoff, max_backoff, connect_timeout
        )
        self._http = self._http_class(
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            # A teacher answers uncompressed; asked so, a proxy should not compress either (a
            # small compressed answer could inflate to gigabytes in memory).
            headers={"Accept-Encoding": "identity"},
        )

    @property
    def timeout(self) -> float:
        """Seconds a request may wait for the teacher's answer."""
        return self._core.timeout

    @property
    def urls(self) -> list[str]:
        return self._core.replicas.urls

    def is_up(self, url: str) -> bool:
        """False while `url` sits out after a connection failure."""
        return self._core.replicas.is_up(url)

    def mark_down(self, url: str, seconds: float = SIT_OUT_S) -> None:
        """Pass `url` over for `seconds` (a caller that saw it fail in a way the client cannot)."""
        self._core.replicas.mark_down(url, seconds)


class TeacherClient(_ClientBase):
    """Synchronous client; safe to share between threads."""

    def _request(
        self, method: str, path: str, url: str | None = None, retries: int | None = None, **kw
    ) -> httpx.Response:
        for attempt in itertools.count():
            target = checked_url(url) if url else self._core.replicas.acquire()
            try:
                response = self._http.request(method, target + path, **kw)
            except httpx.DecodingError as exc:
                raise _undecodable(target, exc) from None
            except httpx.TransportError as exc:
                delay = self._core.delay_after_error(
                    attempt, target, exc, retries, pinned=url is not None
                )
            else:
                delay = self._core.delay_after_response(
                    attempt, target, response, retries, pinned=url is not None
                )
                if delay is None:
                    return self._core.final_reply(target, response)
            finally:
                if url is None:
                    self._core.replicas.release(target)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def health(self, url: str | None = None) -> dict:
        return _json_of(self._request("GET", "/health", url))

    def ready(self, url: str | None = None) -> dict:
        return _json_of(self._request("GET", "/ready", url))

    def info(self, url: str | None = None, retries: int | None = None) -> dict:
        where = url or " / ".join(self.urls)  # the replica that answers is picked per request
        try:
            response = self._request(
                "GET", "/info", url, retries=retries, headers=self._core.headers
            )
        except NotFound as exc:
            raise _not_a_teacher(where, exc) from None
        return _info_of(where, response)

    def connect(self, tokenizer: Any = None, wait_s: float = 120.0) -> list[dict]:
        """Wait up to `wait_s` while each replica loads its model (503), and check its tokenizer
        against `tokenizer` (a HF tokenizer or its 'sha256:...' fingerprint). A replica that does
        not accept connections at all fails at once (TeacherUnreachable, after the usual couple
        of retries): a wrong URL should not cost `wait_s`. Returns each replica's /info. The
        tokenizer found is pinned: an answer from a replica with another one (say, one that joined
        behind a balancer later) raises FingerprintMismatch, not a score."""
        expected = _expected_fingerprint(tokenizer)
        self._core.fingerprint = None  # connecting again pins afresh
        deadline = time.monotonic() + wait_s
        infos = []
        for url in self.urls:
            while True:
                try:  # a teacher that refuses connections at start is an error, not a wait
                    info = self.info(url, retries=2)
                    break
                except NotReady as exc:
                    if time.monotonic() > deadline:
                        raise _at(url, exc) from None
                    time.sleep(0.5)
                except (Unauthorized, ServerError) as exc:  # which replica: another key, no model
                    raise _at(url, exc) from None
            self._core.check_info(url, info, expected)
            infos.append(info)
        return infos

    def score(
        self,
        sequences: Iterable[Any],
        top_k: int = 0,
        candidate_ids: list[list[list[int]]] | None = None,
        temperature: float = 1.0,
        max_positions: int | None = None,
    ) -> ScoreResult:
        """Teacher log-probs of each (prompt_ids, completion_ids); see shared.protocol for shapes."""
        body, headers, request = self._core.score_body(
            sequences, top_k, candidate_ids, temperature, max_positions
        )
        response = self._request("POST", "/score", content=body, headers=headers)
        return self._core.score_result(response, request)

    def score_stream(
        self, requests: Iterable[ScoreRequest | dict], url: str | None = None
    ) -> Iterator[StreamItem]:
        """Send each request as one frame of a /score/stream call as `requests` yields it (read in
        a background thread); yield a StreamItem per scored sequence as soon as it is scored (or
        with `error`: a refused frame, or with `index` too, a sequence that could not be scored),
        while `requests` may still be yielding, then one with done=True. Not retried: a broken stream
        raises ServerError (TeacherUnreachable if it never connected, TeacherTimedOut if it sent
        nothing for `timeout` s), and the caller re-sends what got no result."""
        _refuse_if_closed(self._http)
        target = checked_url(url) if url else self._core.replicas.acquire()
        asked_at = time.monotonic()
        reader = _StreamReader(target, lambda: self._core.replicas.mark_good(target, asked_at))
        frames = (reader.frame(r) for r in requests)
        try:
            with open_stream(
                target,
                "/score/stream",
                self._core.stream_headers(),
                frames,
                self._core.timeout,
                self._core.connect_timeout,
            ) as response:
                if response.status_code >= 400:
                    self._core.reply(response.read())
                self._core.check_answer(target, response.headers.get(FINGERPRINT_HEADER))
                for chunk in response.iter_bytes():
                    yield from reader.feed(chunk)
                reader.finish()
        except httpx.TransportError as exc:
            raise self._core.stream_failure(target, exc) from exc
        finally:
            if url is None:
                self._core.replicas.release(target)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncTeacherClient(_ClientBase):
    """asyncio client with the same methods as TeacherClient, awaited."""

    _http_class = httpx.AsyncClient

    async def _request(
        self, method: str, path: str, url: str | None = None, retries: int | None = None, **kw
    ) -> httpx.Response:
        for attempt in itertools.count():
            target = checked_url(url) if url else self._core.replicas.acquire()
            try:
                response = await self._http.request(method, target + path, **kw)
            except httpx.DecodingError as exc:
                raise _undecodable(target, exc) from None
            except httpx.TransportError as exc:
                delay = self._core.delay_after_error(
                    attempt, target, exc, retries, pinned=url is not None
                )
            else:
                delay = self._core.delay_after_response(
                    attempt, target, response, retries, pinned=url is not None
                )
                if delay is None:
                    return self._core.final_reply(target, response)
            finally:
                if url is None:
                    self._core.replicas.release(target)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def health(self, url: str | None = None) -> dict:
        return _json_of(await self._request("GET", "/health", url))

    async def ready(self, url: str | None = None) -> dict:
        return _json_of(await self._request("GET", "/ready", url))

    async def info(self, url: str | None = None, retries: int | None = None) -> dict:
        where = url or " / ".join(self.urls)
        try:
            response = await self._request(
                "GET", "/info", url, retries=retries, headers=self._core.headers
            )
        except NotFound as exc:
            raise _not_a_teacher(where, exc) from None
        return _info_of(where, response)

    async def connect(self, tokenizer: Any = None, wait_s: float = 120.0) -> list[dict]:
        expected = _expected_fingerprint(tokenizer)
        self._core.fingerprint = None  # connecting again pins afresh
        deadline = time.monotonic() + wait_s
        infos = []
        for url in self.urls:
            while True:
                try:
                    info = await self.info(url, retries=2)
                    break
                except NotReady as exc:
                    if time.monotonic() > deadline:
                        raise _at(url, exc) from None
                    await asyncio.sleep(0.5)
                except (Unauthorized, ServerError) as exc:  # which replica: another key, no model
                    raise _at(url, exc) from None
            self._core.check_info(url, info, expected)
            infos.append(info)
        return infos

    async def score(
        self,
        sequences: Iterable[Any],
        top_k: int = 0,
        candidate_ids: list[list[list[int]]] | None = None,
        temperature: float = 1.0,
        max_positions: int | None = None,
    ) -> ScoreResult:
        body, headers, request = self._core.score_body(
            sequences, top_k, candidate_ids, temperature, max_positions
        )
        response = await self._request("POST", "/score", content=body, headers=headers)
        return self._core.score_result(response, request)

    async def score_stream(
        self,
        requests: AsyncIterable[ScoreRequest | dict] | Iterable[ScoreRequest | dict],
        url: str | None = None,
    ) -> AsyncIterator[StreamItem]:
        """Async form of TeacherClient.score_stream. `requests` is read in a task of its own; a
        plain iterable is read on the event loop, so it must not block (give an async one)."""
        _refuse_if_closed(self._http)
        target = checked_url(url) if url else self._core.replicas.acquire()
        asked_at = time.monotonic()
        reader = _StreamReader(target, lambda: self._core.replicas.mark_good(target, asked_at))

        async def frames():
            if isinstance(requests, AsyncIterable):
                async for r in requests:
                    yield reader.frame(r)
            else:
                for r in requests:
                    yield reader.frame(r)

        try:
            async with open_stream_async(
                target,
                "/score/stream",
                self._core.stream_headers(),
                frames(),
                self._core.timeout,
                self._core.connect_timeout,
            ) as response:
                if response.status_code >= 400:
                    self._core.reply(await response.aread())
                self._core.check_answer(target, response.headers.get(FINGERPRINT_HEADER))
                async for chunk in response.aiter_bytes():
                    for item in reader.feed(chunk):
                        yield item
                reader.finish()
        except httpx.TransportError as exc:
            raise self._core.stream_failure(target, exc) from exc
        finally:
            if url is None:
                self._core.replicas.release(target)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncTeacherClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
