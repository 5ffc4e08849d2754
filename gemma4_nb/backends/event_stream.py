"""A server's streamed reply, read off the wire on a worker thread.

The request is opened (with retries for connection failures, 429 and 5xx) and its lines are read
on a thread, so the caller only ever waits in short slices: the first byte has its own time limit,
and Stop (the kernel's interrupt, or :meth:`OpenAIBackend.cancel` from a chat panel) ends the wait
at once, whatever the server does. What the server gets wrong is named, never shown as an answer:
a web page or other body instead of an event stream, an error body or event, a malformed event, a
stream that ends before its closing ``[DONE]``.
"""

from __future__ import annotations

import json
import queue
import re
import socket
import threading
import time

import httpx

from ..errors import Gemma4Error

POLL_SECONDS = 0.1  # how often a wait looks for Stop


class RemoteError(Gemma4Error):
    """The server could not be reached or answered with an error."""


class Cancelled(KeyboardInterrupt):
    """The wait was abandoned by Stop (a KeyboardInterrupt, like the kernel's own)."""


def loads(text: str, what: str, url: str):
    """JSON from the server, or a :class:`RemoteError` (deep nesting included) naming ``what``."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError):
        raise RemoteError(f"the server at {url} sent {what} that is not valid JSON: {text[:200]!r}") from None


class EventStream:
    """The events (dicts) of one streamed POST, in order; ``done`` tells whether ``[DONE]`` came.

    A body that is one JSON completion (a server that ignored ``stream: true``) is turned into the
    one event it amounts to."""

    def __init__(self, client: httpx.Client, url: str, path: str, body: bytes, *, retries: int, backoff: float,
                 first_byte_timeout: float, cancelled: threading.Event, chat: bool) -> None:
        self.client, self.url, self.path, self.body = client, url, path, body
        self.retries, self.backoff, self.first_byte_timeout = retries, backoff, first_byte_timeout
        self.cancelled, self.chat = cancelled, chat
        self.done = False  # the stream ended with [DONE] (or a complete JSON body)
        self.events = 0
        self._queue: queue.Queue = queue.Queue()
        self._abandoned = threading.Event()
        self._response: httpx.Response | None = None
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._pump, name="gemma4-nb-remote", daemon=True)
        self._thread.start()

    # -- the worker thread ----------------------------------------------------------------------

    def _pump(self) -> None:
        try:
            response = self._open()
        except BaseException as exc:  # handed to the reader, which raises it
            self._queue.put(("error", exc))
            return
        self._response = response
        if self._abandoned.is_set():
            response.close()
            return
        self._queue.put(("open", response))
        try:
            for line in response.iter_lines():
                if self._abandoned.is_set():
                    break
                self._queue.put(("line", line))
            self._queue.put(("end", None))
        except BaseException as exc:
            self._queue.put(("error", exc))
        finally:
            response.close()

    def _open(self) -> httpx.Response:
        last = None
        for attempt in range(self.retries + 1):
            if self._abandoned.is_set():
                raise Cancelled()
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                req = self.client.build_request("POST", self.url + self.path, content=self.body,
                                                headers={"Content-Type": "application/json"})
                resp = self.client.send(req, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                last = RemoteError(f"cannot reach the server at {self.url} ({exc.__class__.__name__}: {exc}). Is it "
                                   "running? Check the URL with `%gemma backend`, or `%gemma backend local` to use "
                                   "the in-kernel model.")
                continue
            except httpx.TimeoutException as exc:  # the first-byte limit ends the wait; the server is not asked again
                raise RemoteError(f"the server at {self.url} did not answer in time ({exc})") from None
            except httpx.HTTPError as exc:
                raise RemoteError(f"the request to {self.url} failed ({exc.__class__.__name__}: {exc})") from None
            if resp.status_code == 429 or resp.status_code >= 500:
                detail = resp.read().decode(errors="replace")[:300]
                resp.close()
                last = RemoteError(f"the server at {self.url} answered HTTP {resp.status_code}: {detail}")
                continue
            if resp.status_code >= 400:
                detail = resp.read().decode(errors="replace")[:500]
                resp.close()
                hint = " (check the API key: $GEMMA4_NB_API_KEY)" if resp.status_code in (401, 403) else ""
                raise RemoteError(f"the server at {self.url} answered HTTP {resp.status_code} to {self.path}: "
                                  f"{detail}{hint}")
            return resp
        raise last

    # -- the reader -------------------------------------------------------------------------------

    def _next(self, first: bool):
        """The next item from the worker, waiting in short slices (Stop and the first-byte limit)."""
        while True:
            if self.cancelled.is_set():
                raise Cancelled()
            try:
                return self._queue.get(timeout=POLL_SECONDS)
            except queue.Empty:
                waited = time.monotonic() - self._started
                if first and waited > self.first_byte_timeout:
                    raise RemoteError(
                        f"the server at {self.url} accepted the request but sent nothing for {waited:.0f} s (the "
                        f"first-byte limit is {self.first_byte_timeout:g} s). It may be overloaded or still loading "
                        "its model: try again, or raise the limit with `%gemma config first_byte_timeout=SECONDS` "
                        "($GEMMA4_NB_FIRST_BYTE_TIMEOUT).") from None

    def _raise(self, exc: BaseException, text_so_far: str = ""):
        if isinstance(exc, (RemoteError, Cancelled)):
            raise exc
        if isinstance(exc, httpx.HTTPError):
            raise RemoteError(f"the connection to {self.url} broke during the reply ({exc.__class__.__name__}: "
                              f"{exc})") from None
        raise RemoteError(f"reading the reply from {self.url} failed ({exc.__class__.__name__}: {exc})") from None

    def __iter__(self):
        kind, item = self._next(first=True)
        if kind == "error":
            self._raise(item)
        content_type = item.headers.get("content-type", "").split(";")[0].strip().lower()
        lines = self._lines()
        first = next((line for line in lines if line.strip()), None)
        if first is None:
            return  # an empty body: `done` stays False, the caller says the reply is cut
        if content_type == "text/event-stream" or first.startswith(("data:", ":", "event:", "id:", "retry:")):
            yield from self._sse(first, lines)
        elif content_type == "application/json" or first.lstrip().startswith(("{", "[")):
            yield from self._json_body(first, lines)
        elif content_type == "text/html" or first.lstrip().startswith("<"):
            page = first
            for line in lines:
                page += "\n" + line
                if len(page) > 4000:
                    break
            title = re.search(r"<title[^>]*>(.*?)</title>", page, re.I | re.S)
            shown = f" titled {' '.join(title.group(1).split())[:80]!r}" if title else ""
            raise RemoteError(f"the server at {self.url} answered with a web page{shown}, not an OpenAI-compatible "
                              f"event stream: check that the URL is the API's base URL (it usually ends in /v1), "
                              "not a web interface or a proxy's login page")
        else:
            raise RemoteError(f"the server at {self.url} answered {content_type or 'an untyped body'}, not an "
                              f"OpenAI-compatible event stream; it began with {first[:120]!r}")

    def _lines(self):
        while True:
            kind, item = self._next(first=False)
            if kind == "line":
                yield item
            elif kind == "end":
                return
            else:
                self._raise(item)

    def _sse(self, first: str, lines):
        for line in _chain(first, lines):
            if not line.startswith("data:"):
                continue  # comments, event names, ids, keep-alives
            data = line[5:].strip()
            if data == "[DONE]":
                self.done = True
                return
            event = loads(data, "an event", self.url)
            if not isinstance(event, dict):
                raise RemoteError(f"the server at {self.url} sent an event that is not a JSON object: {data[:200]!r}")
            if event.get("error"):
                raise RemoteError(f"the server at {self.url} reported an error during the reply: "
                                  f"{_error_text(event['error'])}")
            self.events += 1
            yield event

    def _json_body(self, first: str, lines):
        text = "\n".join(_chain(first, lines))
        body = loads(text, "a body", self.url)
        if isinstance(body, dict) and body.get("error"):
            raise RemoteError(f"the server at {self.url} answered with an error: {_error_text(body['error'])}")
        choices = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(choices, list):
            raise RemoteError(f"the server at {self.url} answered JSON that is not a completion: {text[:200]!r}")
        events = []
        for i, choice in enumerate(choices):
            if not isinstance(choice, dict):
                continue
            if self.chat:
                message = choice.get("message") or {}
                calls = [dict(c, index=j) for j, c in enumerate(message.get("tool_calls") or []) if isinstance(c, dict)]
                delta = {"content": message.get("content") or "", "tool_calls": calls}
                events.append({"choices": [{"index": i, "delta": delta, "finish_reason": choice.get("finish_reason")}]})
            else:
                events.append({"choices": [{"index": i, "text": choice.get("text") or "",
                                            "finish_reason": choice.get("finish_reason")}]})
        if body.get("usage"):
            events.append({"choices": [], "usage": body["usage"]})
        self.done = True  # one whole completion
        self.events += len(events)
        yield from events

    def close(self) -> None:
        """Abandon the request: the worker stops, and a connection in the middle of a reply is shut
        (which ends the generation on the server)."""
        self._abandoned.set()
        response = self._response
        if response is None:
            return
        try:
            stream = response.extensions.get("network_stream")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the worker's read at once
        except (OSError, AttributeError):  # already closed
            pass


def _chain(first: str, rest):
    yield first
    yield from rest


def _error_text(error) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)[:300]
    return str(error)[:300]
