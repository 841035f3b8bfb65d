"""A local fake of the OpenAI embeddings API, so tests exercise the real ``openai`` client.

It speaks ``POST /v1/embeddings`` as the real API does (float or base64 vectors, ``index`` per
input, 401 without the right bearer key, 400 on an empty input, more than 2048 inputs or, when
``max_input_tokens`` is set, an input longer than that many tokens (words, here), or when
``max_request_tokens`` is set, more tokens than that summed over the request), waits
``latency`` seconds before each answer when set (a real API's round trip; ``peak_in_flight`` is
the most calls it held at once), answers
with the hash embedder's vectors (deterministic, so a test can compute the expected result), and
follows a fault plan: fail the next calls with 429 + Retry-After, 500 or a hang past the client's
timeout, or fail a seeded random fraction of calls. Every call is recorded.
:class:`FaultPlanServer` adds mixed random faults and a poison marker (the reliability tests).

    with running_fake_openai_server() as server:
        server.fail_next(1, "429", retry_after=1)
        embedder = create_embedder(replace(settings, base_url=server.base_url), api_key=server.api_key)
"""

from __future__ import annotations

import base64
import collections
import io
import json
import random
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

import numpy as np

from capstone.embeddings.hashing import HashEmbedder

__all__ = [
    "FakeOpenAIServer",
    "Fault",
    "FaultPlanServer",
    "RecordedRequest",
    "running_fake_openai_server",
    "running_fault_plan_server",
]

FaultKind = Literal["429", "500", "hang"]
MAX_INPUTS = 2048  # the real API's limit on inputs per request
HANG_SECONDS = 30.0  # a "hang" outlasts any client timeout a test sets; stop() releases it early


@dataclass(frozen=True)
class Fault:
    """How to fail one call: ``kind``, with a Retry-After (seconds) for 429/500 when given."""

    kind: FaultKind
    retry_after: float | None = None


@dataclass(frozen=True)
class RecordedRequest:
    """One call as the server saw it, and how it answered."""

    path: str
    status: int
    inputs: list[str] = field(default_factory=list)
    model: str | None = None
    dimensions: int | None = None
    encoding_format: str | None = None
    retry_count: int | None = None  # the client's x-stainless-retry-count header: 0 on a first try
    arrived: float = 0.0  # time.monotonic() when the server read the request

    @property
    def tokens(self) -> int:
        """Tokens of the request, as this fake counts them (words)."""
        return sum(len(text.split()) for text in self.inputs)


class FakeOpenAIServer:
    """The server and its state; use :func:`running_fake_openai_server` to run one."""

    def __init__(self, *, api_key: str = "sk-test-fake", native_dimension: int = 1536, seed: int = 0) -> None:
        self.api_key = api_key
        self.native_dimension = native_dimension  # what a model answers when no ``dimensions`` is asked
        self.reverse_order = True  # answer rows in reverse: the client must reorder by ``index``
        self.max_input_tokens: int | None = None  # the model's context length; None: no limit
        self.max_request_tokens: int | None = None  # tokens summed over one request; None: no limit
        self.latency = 0.0  # seconds each answer takes
        self.requests: list[RecordedRequest] = []
        self.peak_in_flight = 0  # the most embedding calls the server held at once
        self._in_flight = 0
        self._faults: collections.deque[Fault] = collections.deque()
        self._failure_rate = 0.0
        self._random_fault = Fault("500")
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._embedders: dict[int, HashEmbedder] = {}
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-openai", daemon=True)

    @property
    def base_url(self) -> str:
        """What to pass as the client's ``base_url``."""
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def fail_next(self, count: int, kind: FaultKind, *, retry_after: float | None = None) -> None:
        """Fail the next ``count`` embedding calls with ``kind``."""
        with self._lock:
            self._faults.extend(Fault(kind, retry_after) for _ in range(count))

    def fail_randomly(
        self, rate: float, *, kind: FaultKind = "500", retry_after: float | None = None
    ) -> None:
        """Fail each later call with probability ``rate`` (seeded: the same calls fail on every run)."""
        with self._lock:
            self._failure_rate, self._random_fault = rate, Fault(kind, retry_after)

    def vectors(self, texts: list[str], dimension: int) -> np.ndarray:
        """The vectors the server answers for ``texts`` (tests compare against these)."""
        with self._lock:
            embedder = self._embedders.setdefault(dimension, HashEmbedder(dimension=dimension))
        return embedder.embed(texts)

    def embedding_requests(self) -> list[RecordedRequest]:
        """The recorded calls to ``/v1/embeddings``, in arrival order."""
        with self._lock:
            return [request for request in self.requests if request.path == "/v1/embeddings"]

    def start(self) -> FakeOpenAIServer:
        """Serve in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; a hanging call is released at once."""
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def next_fault(self) -> Fault | None:
        """The fault planned for the call being answered, if any."""
        with self._lock:
            if self._faults:
                return self._faults.popleft()
            if self._failure_rate and self._rng.random() < self._failure_rate:
                return self._random_fault
            return None

    def record(self, request: RecordedRequest) -> None:
        """Remember one call."""
        with self._lock:
            self.requests.append(request)

    @contextmanager
    def answering(self) -> Iterator[None]:
        """Count one embedding call as in flight while it is answered (``peak_in_flight``)."""
        with self._lock:
            self._in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1

    def hang(self, seconds: float) -> None:
        """Hold a call for ``seconds`` (or until the server stops)."""
        self._stopping.wait(seconds)


@contextmanager
def running_fake_openai_server(**options: Any) -> Iterator[FakeOpenAIServer]:
    """A started :class:`FakeOpenAIServer` on 127.0.0.1 and a free port, stopped on exit."""
    server = FakeOpenAIServer(**options).start()
    try:
        yield server
    finally:
        server.stop()


def _handler_for(server: FakeOpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_EmbeddingsHandler):
        fake = server

    return Handler


class _EmbeddingsHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real API (and the client's connection pool) expect
    disable_nagle_algorithm = True  # headers and body go out in two writes: without it each call waits ~40 ms
    fake: FakeOpenAIServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet: pytest shows failures, not traffic
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        retry_count = self.headers.get("x-stainless-retry-count")
        recorded: dict[str, Any] = {
            "retry_count": int(retry_count) if retry_count is not None else None,
            "arrived": time.monotonic(),
        }
        if self.path != "/v1/embeddings":
            return self._answer_error(404, "not_found", f"no route {self.path}", recorded)
        if self.headers.get("Authorization") != f"Bearer {self.fake.api_key}":
            return self._answer_error(401, "invalid_api_key", "Incorrect API key provided.", recorded)
        try:
            request = json.loads(body)
        except json.JSONDecodeError:
            return self._answer_error(400, "invalid_json", "the body is not JSON", recorded)
        inputs = (
            [request["input"]] if isinstance(request.get("input"), str) else list(request.get("input") or [])
        )
        recorded |= {
            "inputs": inputs,
            "model": request.get("model"),
            "dimensions": request.get("dimensions"),
            "encoding_format": request.get("encoding_format"),
        }
        with self.fake.answering():
            self._answer_request(request, inputs, recorded)

    def _answer_request(self, request: dict[str, Any], inputs: list[str], recorded: dict[str, Any]) -> None:
        if self.fake.latency:
            self.fake.hang(self.fake.latency)
        fault = self.fake.next_fault()
        if fault is not None:
            return self._fail(fault, recorded)
        problem = _invalid(request, inputs, self.fake.max_input_tokens, self.fake.max_request_tokens)
        if problem:
            return self._answer_error(400, "invalid_request_error", problem, recorded)
        self._answer_embeddings(request, inputs, recorded)

    def _answer_embeddings(
        self, request: dict[str, Any], inputs: list[str], recorded: dict[str, Any]
    ) -> None:
        dimension = int(request.get("dimensions") or self.fake.native_dimension)
        vectors = self.fake.vectors(inputs, dimension)
        as_base64 = request.get("encoding_format", "float") == "base64"
        data = [
            {"object": "embedding", "index": i, "embedding": _encode(vector, as_base64)}
            for i, vector in enumerate(vectors)
        ]
        if self.fake.reverse_order:
            data.reverse()
        tokens = sum(len(text.split()) for text in inputs)
        self._answer(
            200,
            {
                "object": "list",
                "data": data,
                "model": request["model"],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
            recorded,
        )

    def _fail(self, fault: Fault, recorded: dict[str, Any]) -> None:
        if fault.kind == "hang":
            self.fake.record(RecordedRequest(self.path, 0, **recorded))  # 0: no answer, the client gave up
            self.fake.hang(HANG_SECONDS)
            self.close_connection = True
            return
        headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
        status, code = (429, "rate_limit_exceeded") if fault.kind == "429" else (500, "server_error")
        self._answer_error(status, code, f"fault plan: {fault.kind}", recorded, headers)

    def _answer_error(
        self,
        status: int,
        code: str,
        message: str,
        recorded: dict[str, Any],
        headers: dict[str, str] | None = None,
    ) -> None:
        error = {"message": message, "type": code, "param": None, "code": code}
        self._answer(status, {"error": error}, recorded, headers)

    def _answer(
        self, status: int, payload: object, recorded: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        self.fake.record(RecordedRequest(self.path, status, **recorded))
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


def _invalid(
    request: dict[str, Any], inputs: list[str], max_tokens: int | None, max_request_tokens: int | None
) -> str | None:
    """What the real API would reject in this request, or None."""
    if not request.get("model"):
        return "you must provide a model parameter"
    if not inputs or len(inputs) > MAX_INPUTS:
        return f"'input' must hold 1 to {MAX_INPUTS} items, got {len(inputs)}"
    if any(not isinstance(text, str) or text == "" for text in inputs):
        return "'input' cannot contain an empty string"
    longest = max(len(text.split()) for text in inputs)
    if max_tokens is not None and longest > max_tokens:
        return (  # the real API's wording
            f"This model's maximum context length is {max_tokens} tokens, however you requested "
            f"{longest} tokens ({longest} in your prompt; 0 for the completion). Please reduce your "
            "prompt; or completion length."
        )
    total = sum(len(text.split()) for text in inputs)
    if max_request_tokens is not None and total > max_request_tokens:
        return f"Requested {total} tokens, max {max_request_tokens} tokens per request"
    return None


def _encode(vector: np.ndarray, as_base64: bool) -> str | list[float]:
    """float: a JSON list; base64: the little-endian float32 bytes, as the real API sends them."""
    if as_base64:
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return [float(x) for x in vector]


# -- a richer fault plan, for the reliability tests ------------------------------------------


class FaultPlanServer(FakeOpenAIServer):
    """The fake OpenAI server, plus two faults its own plan lacks.

    * ``mixed_failure_rate``: each call fails with that probability, as a 429 with Retry-After,
      a 500 with Retry-After or a hang past the client's timeout (seeded: the same calls fail on
      every run that makes its calls in the same order, as ``dag.test()`` does);
    * ``poison_marker``: every call with an input containing the marker fails with a 500, so the
      batch holding that text fails however often it is retried.
    """

    def __init__(self, *, seed: int = 0, **options: Any) -> None:
        super().__init__(seed=seed, **options)
        self.mixed_failure_rate = 0.0
        self.mixed_retry_after = 0.05
        self.poison_marker: str | None = None
        self._mixed_rng = random.Random(seed)
        self._mixed_lock = threading.Lock()
        self._httpd.RequestHandlerClass = _poison_aware_handler(self)

    def next_fault(self) -> Fault | None:
        planned = super().next_fault()
        if planned is not None:
            return planned
        with self._mixed_lock:
            if self._mixed_rng.random() >= self.mixed_failure_rate:
                return None
            kind: FaultKind = self._mixed_rng.choice(["429", "500", "hang"])
        return Fault(kind, None if kind == "hang" else self.mixed_retry_after)

    def poisoned(self, inputs: Sequence[str]) -> bool:
        """True when the call must fail because of the poison marker."""
        marker = self.poison_marker
        return marker is not None and any(marker in text for text in inputs)

    def failed_requests(self) -> list[RecordedRequest]:
        """Embedding calls answered with an error, or not at all (status 0: a hang)."""
        return [request for request in self.embedding_requests() if request.status != 200]

    def answered_texts(self) -> list[str]:
        """Every input of every successful embedding call (a text twice: embedded twice)."""
        return [
            text for request in self.embedding_requests() if request.status == 200 for text in request.inputs
        ]


def _poison_aware_handler(server: FaultPlanServer) -> type[_EmbeddingsHandler]:
    class Handler(_EmbeddingsHandler):
        fake = server

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                inputs = json.loads(body).get("input") or []
            except (json.JSONDecodeError, AttributeError):
                inputs = []
            if isinstance(inputs, str):
                inputs = [inputs]
            if server.poisoned(inputs):
                recorded = {
                    "inputs": inputs,
                    "retry_count": _int(self.headers.get("x-stainless-retry-count")),
                }
                return self._fail(Fault("500", 0.01), recorded)
            self.rfile = io.BytesIO(body)  # let the fake's own handler read the body again
            return super().do_POST()

    return Handler


def _int(value: str | None) -> int | None:
    return int(value) if value is not None else None


@contextmanager
def running_fault_plan_server(**options: Any) -> Iterator[FaultPlanServer]:
    """A started :class:`FaultPlanServer`, stopped on exit (a hanging call is released)."""
    server = FaultPlanServer(**options)
    server.start()
    try:
        yield server
    finally:
        server.stop()
