"""The wire format of PROTOCOL.md version 1: framing, frame builders, field checks, HMAC proofs.

Pure Python, no Django: the bus (bus/session.py) and the crawler side
(jobsite_crawler) both use it, and it can be tested on its own
(tests/test_protocol.py, hypothesis included). Every frame either side sends
is built by one of the `*_frame` functions below, so a field is spelled in one
place only; extensions (docs/protocol.md sections 13-16) are optional keyword
arguments that old peers ignore.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import secrets
import time
from typing import Any, cast

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME = 1024 * 1024
HANDSHAKE_TIMEOUT = 10.0
MAX_JOB_ID = 2**63 - 1
MAX_ATTEMPT = 2**31 - 1
MAX_NESTING = 64
# Python's own default (sys.int_max_str_digits), made explicit so that a library
# raising or lifting that global limit cannot open a quadratic-time parse.
MAX_INT_DIGITS = 4300
_NONCE = re.compile(r"[0-9a-fA-F]{32,1024}")

# Error codes. The first five are PROTOCOL.md's; `invalid` is ours for a
# well-formed frame of a known type whose fields are wrong (the session stays).
BAD_FRAME = "bad_frame"
UNKNOWN_TYPE = "unknown_type"
UNSUPPORTED_PROTOCOL = "unsupported_protocol"
UNAUTHORIZED = "unauthorized"
STALE = "stale"
INVALID = "invalid"
TIMEOUT = "timeout"  # ours: a handshake step did not come in time (then close)


class FrameError(Exception):
    """A framing error: the session must end (after a bad_frame error if possible).

    `frames` holds the complete frames that came before the bad one in the
    same read: they are well-formed and must still be processed (an outcome
    among them is then acked before the session closes).
    """

    def __init__(self, message: str, frames: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.frames: list[dict[str, Any]] = frames or []


class FieldError(Exception):
    """A well-formed frame whose fields are wrong: answer `invalid`, keep the session."""


class FrameReader:
    """Splits a byte stream into JSON frames, never holding more than one frame of bytes.

    feed() returns the complete frames; it raises FrameError as soon as the
    current line is longer than max_frame (newline included), even before its
    newline arrives, so a 100 MB line costs at most max_frame bytes of memory.
    The error carries the frames decoded before the bad one (FrameError.frames).
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME):
        self.max_frame = max_frame
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        frames: list[dict[str, Any]] = []
        try:
            self._feed(data, frames)
        except FrameError as exc:
            raise FrameError(str(exc), frames) from None
        return frames

    def _feed(self, data: bytes, frames: list[dict[str, Any]]) -> None:
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            line_length = len(self._buffer) + (end - start) + 1
            if line_length > self.max_frame:
                self._buffer.clear()
                raise FrameError(f"frame of at least {line_length} bytes exceeds the limit of {self.max_frame}")
            if self._buffer:
                self._buffer += data[start:end]
                line = bytes(self._buffer)
                self._buffer.clear()
            else:
                line = data[start:end]
            frames.append(decode_frame(line))
            start = end + 1
        rest = len(data) - start
        if rest:
            if len(self._buffer) + rest >= self.max_frame:  # no room left for the newline
                self._buffer.clear()
                raise FrameError(f"frame exceeds the limit of {self.max_frame} bytes")
            self._buffer += data[start:]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_int(text: str) -> int:
    if len(text) - text.startswith("-") > MAX_INT_DIGITS:
        raise ValueError(f"an integer of more than {MAX_INT_DIGITS} digits is out of range")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 overflows to inf, which JSON cannot carry back
        raise ValueError(f"number {text[:40]}{'...' if len(text) > 40 else ''} is out of range")
    return value


def _text_ok(value: Any) -> bool:
    """False if a string or key holds a lone surrogate (a \\ud800 escape): it is not UTF-8 text."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def _depth_ok(value: Any) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_NESTING:
            return False
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
    return True


def decode_frame(line: bytes) -> dict[str, Any]:
    """Decode one line (without its newline) into a frame, or raise FrameError."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FrameError(f"frame is not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        frame = json.loads(text, parse_constant=_reject_constant, parse_int=_parse_int, parse_float=_parse_float)
    except RecursionError:
        raise FrameError("frame is nested too deeply") from None
    except ValueError as exc:
        raise FrameError(f"frame is not JSON: {exc}") from None
    if not isinstance(frame, dict):
        raise FrameError(f"frame is a JSON {type(frame).__name__}, not an object")
    if not isinstance(frame.get("type"), str):
        raise FrameError("frame has no string field 'type'")
    if not _depth_ok(frame):
        raise FrameError(f"frame is nested deeper than {MAX_NESTING} levels")
    if "\\u" in text and not _text_ok(frame):
        raise FrameError("frame has a string with a lone surrogate escape, which is not UTF-8 text")
    return frame


def encode_frame(frame: dict[str, Any]) -> bytes:
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode() + b"\n"


Frame = dict[str, Any]
JobKey = tuple[int, int]  # (job_id, attempt)


def _with(frame: Frame, extra: dict[str, Any]) -> Frame:
    """Add the optional fields that are set (None means absent: an old peer sees the frame it knows)."""
    frame.update((name, value) for name, value in extra.items() if value is not None)
    return frame


# --- Frame builders: handshake ------------------------------------------------------


def welcome_frame(crawler: str, nonce: str) -> Frame:
    return {"type": "welcome", "protocol": PROTOCOL_VERSION, "crawler": crawler, "nonce": nonce}


def hello_frame(*, node: str, session: str, heartbeat: float, nonce: str, auth: str | None) -> Frame:
    frame: Frame = {
        "type": "hello",
        "protocol": PROTOCOL_VERSION,
        "node": node,
        "session": session,
        "heartbeat": heartbeat,
        "nonce": nonce,
    }
    return _with(frame, {"auth": auth})


def ready_frame(
    *,
    slots: int,
    auth: str | None,
    running: list[JobKey],
    robots: bool | None = None,
    kinds: list[str] | None = None,
) -> Frame:
    """`robots` (section 15) and `kinds` (section 16) are extensions: absent means no robots, every kind."""
    frame: Frame = {"type": "ready", "slots": slots, "running": [list(key) for key in running]}
    return _with(frame, {"auth": auth, "robots": robots or None, "kinds": kinds})


# --- Frame builders: bus to crawler ----------------------------------------------------


def assign_frame(job_id: int, attempt: int, *, url: str, payload: Any, kind: str | None = None) -> Frame:
    frame: Frame = {"type": "assign", "job_id": job_id, "attempt": attempt, "url": url, "payload": payload}
    return _with(frame, {"kind": kind or None})


def ack_frame(job_id: int, attempt: int, status: str) -> Frame:
    return {"type": "ack", "job_id": job_id, "attempt": attempt, "status": status}


def cancel_frame(job_id: int, attempt: int) -> Frame:
    return {"type": "cancel", "job_id": job_id, "attempt": attempt}


def robots_request_frame(host: str, url: str) -> Frame:
    return {"type": "robots", "host": host, "url": url}


# --- Frame builders: crawler to bus ----------------------------------------------------


def capacity_frame(slots: int) -> Frame:
    return {"type": "capacity", "slots": slots}


def started_frame(job_id: int, attempt: int) -> Frame:
    return {"type": "started", "job_id": job_id, "attempt": attempt}


def progress_frame(
    job_id: int, attempt: int, *, done: int | None = None, total: int | None = None, message: str | None = None
) -> Frame:
    return _with(
        {"type": "progress", "job_id": job_id, "attempt": attempt}, {"done": done, "total": total, "message": message}
    )


def done_frame(job_id: int, attempt: int, result: dict[str, Any], *, items: list[Any] | None = None) -> Frame:
    """`items` (section 17) carries the job's stored items with its outcome, resent with it until acked."""
    return _with({"type": "done", "job_id": job_id, "attempt": attempt, "result": result}, {"items": items})


def failed_frame(
    job_id: int,
    attempt: int,
    error: str,
    *,
    retryable: bool,
    cause: str | None = None,
    status: int | None = None,
    retry_after: float | None = None,
) -> Frame:
    """`cause`, `status` and `retry_after` are the politeness extension (section 14)."""
    frame: Frame = {"type": "failed", "job_id": job_id, "attempt": attempt, "error": error, "retryable": retryable}
    return _with(frame, {"cause": cause, "status": status, "retry_after": retry_after})


def robots_answer_frame(host: str, status: int, body: str, error: str) -> Frame:
    return {"type": "robots", "host": host, "status": status, "body": body, "error": error}


# --- Frame builders: both ways ---------------------------------------------------------


def error_frame(code: str, message: str, **extra: Any) -> Frame:
    return {"type": "error", "code": code, "message": message[:500], **extra}


def heartbeat_frame(*, running: list[JobKey] | None = None, **extra: Any) -> Frame:
    """The crawler's heartbeats list its running jobs; the bus's carry only `ts`."""
    frame: Frame = {"type": "heartbeat", "ts": time.time(), **extra}
    if running is not None:
        frame["running"] = [list(key) for key in running]
    return frame


def bye_frame(reason: str, *, resume_within: float | None = None) -> Frame:
    """`resume_within` (section 13): a hand-over; keep the session's jobs running that long."""
    return _with({"type": "bye", "reason": reason}, {"resume_within": resume_within})


# --- Field checks --------------------------------------------------------------


def job_id_of(frame: dict[str, Any]) -> int:
    value = frame.get("job_id")
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError("job_id must be an integer")
    if not 1 <= value <= MAX_JOB_ID:
        raise FieldError(f"job_id must be between 1 and {MAX_JOB_ID}")
    return value


def attempt_of(frame: dict[str, Any]) -> int:
    value = frame.get("attempt")
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError("attempt must be an integer")
    if not 1 <= value <= MAX_ATTEMPT:
        raise FieldError(f"attempt must be between 1 and {MAX_ATTEMPT}")
    return value


def slots_of(frame: dict[str, Any]) -> int:
    value = frame.get("slots")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1_000_000:
        raise FieldError("slots must be an integer between 0 and 1000000")
    return value


def running_of(frame: dict[str, Any], *, limit: int = 1_000_000) -> list[tuple[int, int]]:
    """The optional `running` list of ready/heartbeat frames: [[job_id, attempt], ...]."""
    value = frame.get("running", [])
    if value is None:
        return []
    if not isinstance(value, list):
        raise FieldError("running must be a list of [job_id, attempt] pairs")
    if len(value) > limit:
        raise FieldError(f"running lists more than {limit} jobs")
    pairs = []
    for item in value:
        if not isinstance(item, list) or len(item) != 2:
            raise FieldError("running must be a list of [job_id, attempt] pairs")
        pairs.append((job_id_of({"job_id": item[0]}), attempt_of({"attempt": item[1]})))
    return pairs


MAX_KINDS = 100
MAX_KIND_LENGTH = 100


def kinds_of(frame: dict[str, Any]) -> list[str] | None:
    """ready's optional `kinds` (section 16): the job kinds the crawler takes; None (absent) means every kind."""
    value = frame.get("kinds")
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > MAX_KINDS:
        raise FieldError(f"kinds must be a list of at most {MAX_KINDS} kind names")
    kinds = []
    for kind in value:
        if not isinstance(kind, str) or not 0 < len(kind) <= MAX_KIND_LENGTH or "\x00" in kind:
            raise FieldError(f"each kind must be a non-empty string of at most {MAX_KIND_LENGTH} characters")
        kinds.append(kind)
    return sorted(set(kinds))


def items_of(frame: dict[str, Any], *, limit: int) -> tuple[list[dict[str, Any]], bool] | None:
    """done's optional `items` (section 17): (the first `limit` JSON objects, whether any were left out).

    None when the frame has no `items`. An item that is not a JSON object is
    a FieldError: the crawler is told, and the outcome is not recorded.
    """
    value = frame.get("items")
    if value is None:
        return None
    if not isinstance(value, list):
        raise FieldError("items must be a list of JSON objects")
    if not all(isinstance(item, dict) for item in value):
        raise FieldError("each of items must be a JSON object")
    return value[:limit], len(value) > limit


def robots_answer_of(frame: dict[str, Any], *, max_body: int) -> tuple[str, int, str, str]:
    """A crawler's `robots` answer: (host, status, body, error); status 0 means no answer from the site."""
    host = frame.get("host")
    if not isinstance(host, str) or not 0 < len(host) <= 300:
        raise FieldError("robots.host must be the host key the bus asked about")
    status = frame.get("status")
    if isinstance(status, bool) or not isinstance(status, int) or not (status == 0 or 100 <= status <= 599):
        raise FieldError("robots.status must be an HTTP status (100-599), or 0 when the site did not answer")
    body = frame.get("body", "")
    error = frame.get("error", "")
    if not isinstance(body, str) or len(body) > max_body:
        raise FieldError("robots.body must be a string (the file's text)")
    if not isinstance(error, str):
        raise FieldError("robots.error must be a string")
    return host.replace("\x00", ""), status, body.replace("\x00", ""), error[:500].replace("\x00", "")


def number_of(frame: dict[str, Any], name: str) -> float | None:
    value = frame.get(name)
    if value is None:
        return None
    try:
        finite = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    except OverflowError:  # an integer too large for a double (JSON allows 4300 digits)
        finite = False
    if not finite:
        raise FieldError(f"{name} must be a finite number")
    return cast(float, value)  # an int or a finite float


def nonce_ok(value: Any) -> bool:
    # Not int(value, 16): it would also take "0x", "_", signs, spaces and non-ASCII digits.
    return isinstance(value, str) and _NONCE.fullmatch(value) is not None


def new_nonce() -> str:
    return secrets.token_hex(32)


# --- Authentication (HMAC-SHA256 proofs) ------------------------------------------


def _proof(token: str, label: str, nonce: str, session: str) -> str:
    message = f"jobsite-bus/1 {label} {nonce} {session}".encode()
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def hello_proof(token: str, welcome_nonce: str, session: str) -> str:
    return _proof(token, "hello", welcome_nonce, session)


def ready_proof(token: str, hello_nonce: str, session: str) -> str:
    return _proof(token, "ready", hello_nonce, session)


def proof_matches(expected: str, given: Any) -> bool:
    if not isinstance(given, str):
        return False
    # Hex is case-insensitive; bytes.lower() folds ASCII only and keeps the time constant.
    return hmac.compare_digest(expected.encode().lower(), given.encode("utf-8", "replace").lower())
