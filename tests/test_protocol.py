"""Unit and property tests of jobsite_crawler/wire.py: framing, field checks and HMAC proofs (no database)."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobsite_crawler import wire as protocol
from jobsite_crawler.wire import (
    DEFAULT_MAX_FRAME,
    MAX_ATTEMPT,
    MAX_JOB_ID,
    MAX_NESTING,
    FieldError,
    FrameError,
    FrameReader,
    attempt_of,
    decode_frame,
    encode_frame,
    error_frame,
    heartbeat_frame,
    hello_proof,
    job_id_of,
    new_nonce,
    nonce_ok,
    number_of,
    proof_matches,
    ready_proof,
    running_of,
    slots_of,
)

PROPERTY = settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def feed_in_chunks(reader: FrameReader, stream: bytes, cuts: list[int]) -> list[dict]:
    frames = []
    start = 0
    for cut in sorted(set(cuts)) + [len(stream)]:
        frames.extend(reader.feed(stream[start:cut]))
        start = cut
    return frames


# --- Strategies ----------------------------------------------------------------

json_keys = st.sampled_from(["type", "job_id", "a", "é", "x y", ""]) | st.text(max_size=6)
json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)  # hypothesis leaves out surrogates by default
)
# Objects are built from lists of pairs (duplicate keys collapse): st.dictionaries is
# several times slower to draw, and these tests run 2000 examples.
json_values = st.recursive(
    json_leaves,
    lambda children: st.lists(children, max_size=3) | st.lists(st.tuples(json_keys, children), max_size=3).map(dict),
    max_leaves=4,
)
frames_strategy = st.builds(
    lambda kind, fields: {**dict(fields), "type": kind},
    st.text(min_size=1, max_size=12),
    st.lists(st.tuples(json_keys, json_values), max_size=3),
)


# --- FrameReader: properties -------------------------------------------------------


@PROPERTY
@given(frames=st.lists(frames_strategy, max_size=4), data=st.data())
def test_frames_split_at_random_points_equal_frames_fed_whole(frames, data):
    stream = b"".join(encode_frame(frame) for frame in frames)
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=8), label="cuts")

    whole = FrameReader().feed(stream)
    split_reader = FrameReader()
    split = feed_in_chunks(split_reader, stream, cuts)

    assert whole == frames
    assert split == frames
    assert split_reader.buffered == 0


stream_pieces = st.lists(
    st.sampled_from([b"\n", b"{", b"}", b'"type":"x"', b'{"type":"a"}\n', b"[", b"\xff", b"\xc3", b"NaN", b'"', b","])
    | st.binary(max_size=40),
    max_size=12,
)


@PROPERTY
@given(pieces=stream_pieces, max_frame=st.integers(min_value=1, max_value=64), data=st.data())
def test_random_byte_streams_raise_only_frame_error_and_never_buffer_more_than_max_frame(pieces, max_frame, data):
    stream = b"".join(pieces)
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=10), label="cuts")
    reader = FrameReader(max_frame=max_frame)
    received, failed, start = [], False, 0
    for cut in sorted(set(cuts)) + [len(stream)]:
        try:
            received.extend(reader.feed(stream[start:cut]))
        except FrameError as exc:
            assert str(exc)
            failed = True
            break  # a framing error ends the session
        finally:
            assert reader.buffered <= max_frame
        start = cut
    for frame in received:
        assert isinstance(frame, dict) and isinstance(frame["type"], str)
    if not failed:
        # Then every line was short enough and valid: the frames are exactly the lines decoded.
        *lines, partial = stream.split(b"\n")
        assert received == [json.loads(line) for line in lines]
        assert all(len(line) + 1 <= max_frame for line in lines)
        assert reader.buffered == len(partial) < max_frame


def test_a_100_mb_line_without_newline_fails_as_soon_as_the_limit_is_passed():
    reader = FrameReader()
    chunk = b"x" * 65536
    fed = 0
    with pytest.raises(FrameError, match="exceeds the limit"):
        for _ in range(100 * 1024 * 1024 // len(chunk)):
            reader.feed(chunk)
            fed += len(chunk)
            assert reader.buffered < DEFAULT_MAX_FRAME  # there must stay room for the newline
    # The error came with the chunk that left no room for the newline, not later.
    assert fed + len(chunk) == DEFAULT_MAX_FRAME
    assert reader.buffered == 0


def test_a_long_line_fed_in_one_piece_never_enters_the_buffer():
    reader = FrameReader(max_frame=1024)
    with pytest.raises(FrameError):
        reader.feed(b"x" * 5000)
    assert reader.buffered == 0
    with pytest.raises(FrameError, match="at least 5001 bytes"):
        reader.feed(b"x" * 5000 + b"\n")
    assert reader.buffered == 0


def frame_of_exactly(size: int) -> bytes:
    """A valid frame of `size` bytes, newline included."""
    head, tail = b'{"type":"x","pad":"', b'"}\n'
    return head + b"a" * (size - len(head) - len(tail)) + tail


@pytest.mark.parametrize("max_frame", [64, 1024, DEFAULT_MAX_FRAME])
def test_a_frame_of_exactly_max_frame_bytes_is_accepted_and_one_byte_more_is_rejected(max_frame):
    exact = frame_of_exactly(max_frame)
    assert len(exact) == max_frame
    assert FrameReader(max_frame=max_frame).feed(exact) == [json.loads(exact)]

    too_long = frame_of_exactly(max_frame + 1)
    with pytest.raises(FrameError, match=f"limit of {max_frame}"):
        FrameReader(max_frame=max_frame).feed(too_long)


@pytest.mark.parametrize("max_frame", [64, 1024])
def test_the_limit_holds_when_frames_arrive_byte_by_byte(max_frame):
    reader = FrameReader(max_frame=max_frame)
    frames = []
    for byte in frame_of_exactly(max_frame):
        frames.extend(reader.feed(bytes([byte])))
    assert frames == [{"type": "x", "pad": "a" * (max_frame - 22)}]

    reader = FrameReader(max_frame=max_frame)
    too_long = frame_of_exactly(max_frame + 1)
    fed = 0
    with pytest.raises(FrameError):
        for byte in too_long:
            fed += 1
            reader.feed(bytes([byte]))
            assert reader.buffered < max_frame
    # Rejected on the byte that left no room for the newline, before the newline came.
    assert fed == max_frame


def test_frames_around_a_partial_line_come_out_in_order():
    reader = FrameReader()
    assert reader.feed(b'{"type":"a"}\n{"type":') == [{"type": "a"}]
    assert reader.buffered == len(b'{"type":')
    assert reader.feed(b'"b"}\n{"type":"c"}\n') == [{"type": "b"}, {"type": "c"}]
    assert reader.buffered == 0


# --- decode_frame: framing errors ---------------------------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"type":"x","s":"\xff"}', "not UTF-8"),
        (b'{"type":"x","s":"\xc3"}', "not UTF-8"),
        (b"\xed\xa0\x80", "not UTF-8"),  # an encoded surrogate is not UTF-8 either
        (b"", "not JSON"),
        (b'{"type":"x"', "not JSON"),
        (b'{"type":"x"} {"type":"y"}', "not JSON"),
        (b"{'type':'x'}", "not JSON"),
        (b'[{"type":"x"}]', "JSON list, not an object"),
        (b'"type"', "JSON str, not an object"),
        (b"17", "JSON int, not an object"),
        (b"null", "JSON NoneType, not an object"),
        (b"{}", "no string field 'type'"),
        (b'{"type":null}', "no string field 'type'"),
        (b'{"type":1}', "no string field 'type'"),
        (b'{"type":["x"]}', "no string field 'type'"),
        (b'{"type":"x","n":NaN}', "NaN is not valid JSON"),
        (b'{"type":"x","n":Infinity}', "Infinity is not valid JSON"),
        (b'{"type":"x","n":-Infinity}', "-Infinity is not valid JSON"),
        (b'{"type":"x","n":1e400}', "out of range"),
        (b'{"type":"x","n":-1e400}', "out of range"),
        (b'{"type":"x","n":' + b"1" * 10_000 + b"}", "more than 4300 digits"),
        (b'{"type":"x","n":-' + b"9" * 10_000 + b"}", "more than 4300 digits"),
        (b'{"type":"x","n":' + b"1" * 10_000 + b".5}", "out of range"),
        (b'{"type":"x","s":"\\ud800"}', "lone surrogate"),
        (b'{"type":"x","\\udc00":1}', "lone surrogate"),
        (b'{"type":"x","l":[["\\ud83d"]]}', "lone surrogate"),
    ],
)
def test_malformed_frames_are_framing_errors_with_a_useful_message(line, message):
    with pytest.raises(FrameError, match=message.replace("[", r"\[")):
        decode_frame(line)


@pytest.mark.parametrize("line", [b"[" * 100_000, b'{"type":"x","a":' + b"[" * 100_000, b'{"a":' * 100_000])
def test_deeply_nested_json_is_a_framing_error_not_a_crash(line):
    with pytest.raises(FrameError, match="nested"):
        decode_frame(line)
    with pytest.raises(FrameError, match="nested"):
        FrameReader(max_frame=1024 * 1024).feed(line + b"\n")


def nested(levels: int) -> bytes:
    """A frame whose deepest value sits at `levels` (the frame object itself is level 1)."""
    return b'{"type":"x","a":' + b"[" * (levels - 1) + b"]" * (levels - 1) + b"}"


def test_nesting_is_allowed_up_to_max_nesting_levels():
    assert decode_frame(nested(MAX_NESTING))["type"] == "x"
    with pytest.raises(FrameError, match=f"deeper than {MAX_NESTING}"):
        decode_frame(nested(MAX_NESTING + 1))
    with pytest.raises(FrameError, match=f"deeper than {MAX_NESTING}"):
        decode_frame(b'{"type":"x","a":' + b'{"b":' * MAX_NESTING + b"1" + b"}" * MAX_NESTING + b"}")


def test_well_formed_frames_decode():
    assert decode_frame(b'{"type":"x","type":"y"}') == {"type": "y"}  # duplicate keys: the last wins
    assert decode_frame(b' {"type":"x"}\r') == {"type": "x"}  # JSON whitespace around the object
    assert decode_frame('{"type":"é","m":"\\ud83d\\ude00"}'.encode()) == {"type": "é", "m": "😀"}
    assert decode_frame(b'{"type":"x","unknown":{"a":[1,2.5,null,true]}}')["unknown"] == {"a": [1, 2.5, None, True]}
    assert decode_frame(b'{"type":"x","n":' + b"9" * 4300 + b"}")["n"] == int("9" * 4300)
    assert decode_frame(b'{"type":"x","n":1e-400}')["n"] == 0.0  # underflow is harmless
    assert decode_frame(b'{"type":"x","id":' + str(MAX_JOB_ID + 1).encode() + b"}")["id"] == MAX_JOB_ID + 1


def test_numbers_are_not_capped_by_the_interpreter_wide_digit_limit():
    import sys

    old = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)  # some library lifted Python's own limit
    try:
        with pytest.raises(FrameError, match="digits"):
            decode_frame(b'{"type":"x","n":' + b"1" * 10_000 + b"}")
    finally:
        sys.set_int_max_str_digits(old)


# --- encode_frame and helpers ------------------------------------------------------


def test_encode_frame_is_one_compact_utf8_line():
    line = encode_frame({"type": "progress", "message": "é\nx", "n": 1})
    assert line == '{"type":"progress","message":"é\\nx","n":1}\n'.encode()
    assert line.count(b"\n") == 1
    with pytest.raises(ValueError):
        encode_frame({"type": "heartbeat", "ts": math.nan})


def test_error_and_heartbeat_frames():
    frame = error_frame(protocol.STALE, "m" * 600, job_id=3, attempt=1)
    assert frame == {"type": "error", "code": "stale", "message": "m" * 500, "job_id": 3, "attempt": 1}
    beat = heartbeat_frame(running=[[1, 2]])
    assert beat["type"] == "heartbeat" and isinstance(beat["ts"], float) and beat["running"] == [[1, 2]]
    assert decode_frame(encode_frame(beat)[:-1]) == beat


# --- Field checks --------------------------------------------------------------------

BAD_IDS = [True, False, 1.0, 2.5, "1", None, [1], {"a": 1}, 0, -1, -(2**63)]


@pytest.mark.parametrize("value", [*BAD_IDS, MAX_JOB_ID + 1, 2**64])
def test_job_id_of_rejects_anything_but_an_integer_in_range(value):
    with pytest.raises(FieldError, match="job_id"):
        job_id_of({"job_id": value})


def test_job_id_of_accepts_the_whole_range():
    assert job_id_of({"job_id": 1}) == 1
    assert job_id_of({"job_id": MAX_JOB_ID}) == 2**63 - 1
    with pytest.raises(FieldError, match="job_id"):
        job_id_of({})


@pytest.mark.parametrize("value", [*BAD_IDS, MAX_ATTEMPT + 1, MAX_JOB_ID + 1])
def test_attempt_of_rejects_anything_but_an_integer_in_range(value):
    with pytest.raises(FieldError, match="attempt"):
        attempt_of({"attempt": value})


def test_attempt_of_accepts_the_whole_range():
    assert attempt_of({"attempt": 1}) == 1
    assert attempt_of({"attempt": MAX_ATTEMPT}) == 2**31 - 1
    with pytest.raises(FieldError, match="attempt"):
        attempt_of({})


@given(st.integers())
def test_id_checks_agree_with_their_ranges(value):
    for check, name, top in ((job_id_of, "job_id", MAX_JOB_ID), (attempt_of, "attempt", MAX_ATTEMPT)):
        if 1 <= value <= top:
            assert check({name: value}) == value
        else:
            with pytest.raises(FieldError):
                check({name: value})


def test_running_of_reads_job_attempt_pairs():
    assert running_of({}) == []
    assert running_of({"running": None}) == []
    assert running_of({"running": []}) == []
    assert running_of({"running": [[17, 3], [18, 1], [17, 3]]}) == [(17, 3), (18, 1), (17, 3)]
    assert running_of({"running": [[MAX_JOB_ID, MAX_ATTEMPT]]}) == [(MAX_JOB_ID, MAX_ATTEMPT)]


@pytest.mark.parametrize(
    "running",
    [
        {},
        "17,3",
        17,
        [17, 3],
        [[17]],
        [[17, 3, 1]],
        [[]],
        [{"job_id": 17, "attempt": 3}],
        [[17, 0]],
        [[0, 1]],
        [[17, True]],
        [[17.0, 3]],
        [["17", 3]],
        [[17, 3], None],
        [[MAX_JOB_ID + 1, 1]],
        [[1, MAX_ATTEMPT + 1]],
    ],
)
def test_running_of_rejects_anything_but_a_list_of_valid_pairs(running):
    with pytest.raises(FieldError):
        running_of({"running": running})


def test_running_of_enforces_its_limit():
    assert len(running_of({"running": [[1, 1]] * 3}, limit=3)) == 3
    with pytest.raises(FieldError, match="more than 3"):
        running_of({"running": [[1, 1]] * 4}, limit=3)


@pytest.mark.parametrize("value", [0, 1, 17, 1_000_000])
def test_slots_of_accepts_zero_to_a_million(value):
    assert slots_of({"slots": value}) == value


@pytest.mark.parametrize("value", [None, -1, 1_000_001, True, False, 1.0, "4", [4]])
def test_slots_of_rejects_other_values(value):
    with pytest.raises(FieldError, match="slots"):
        slots_of({"slots": value})
    with pytest.raises(FieldError, match="slots"):
        slots_of({})


def test_number_of_takes_finite_numbers_or_nothing():
    assert number_of({}, "done") is None
    assert number_of({"done": None}, "done") is None
    assert number_of({"done": 4}, "done") == 4
    assert number_of({"ts": 1.5}, "ts") == 1.5
    for bad in (True, "4", math.inf, math.nan, [1]):
        with pytest.raises(FieldError, match="done"):
            number_of({"done": bad}, "done")


# --- Nonces and HMAC proofs ------------------------------------------------------------


def test_new_nonces_are_valid_and_fresh():
    nonces = {new_nonce() for _ in range(100)}
    assert len(nonces) == 100
    assert all(nonce_ok(nonce) and len(nonce) == 64 for nonce in nonces)


@pytest.mark.parametrize("nonce", ["a" * 32, "0123456789abcdefABCDEF0123456789", "f" * 1024])
def test_nonce_ok_accepts_hex_of_32_to_1024_digits(nonce):
    assert nonce_ok(nonce)


@pytest.mark.parametrize(
    "nonce",
    [
        None,
        17,
        b"a" * 32,
        "a" * 31,
        "f" * 1025,
        "g" * 32,
        "",
        "0x" + "a" * 32,
        "-" + "a" * 32,
        "+" + "a" * 32,
        " " + "a" * 32,
        "a" * 32 + "\n",
        "a" * 16 + "_" + "a" * 16,
        "a" * 16 + " " + "a" * 16,
        "١" * 32,  # Arabic-Indic digits
    ],
)
def test_nonce_ok_rejects_anything_but_plain_hex(nonce):
    assert not nonce_ok(nonce)


def hmac_sha256_by_hand(key: bytes, message: bytes) -> str:
    """RFC 2104 spelled out, so the test does not trust the hmac module the code uses."""
    block = 64
    if len(key) > block:
        key = hashlib.sha256(key).digest()
    key = key.ljust(block, b"\0")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in key) + message).digest()
    return hashlib.sha256(bytes(b ^ 0x5C for b in key) + inner).hexdigest()


SESSION = "6f1c3a52-8d0e-4c7b-9a51-2f4b8e0d7c13"
WELCOME_NONCE = "00112233445566778899aabbccddeeff"
HELLO_NONCE = "ffeeddccbbaa99887766554433221100" * 2


@pytest.mark.parametrize("token", ["s3cret", "t" * 100, "jöbsite token"])
def test_proofs_are_hmac_sha256_of_protocol_md_message_strings(token):
    hello_message = ("jobsite-bus/1 hello " + WELCOME_NONCE + " " + SESSION).encode()
    ready_message = ("jobsite-bus/1 ready " + HELLO_NONCE + " " + SESSION).encode()
    assert hello_proof(token, WELCOME_NONCE, SESSION) == hmac_sha256_by_hand(token.encode(), hello_message)
    assert ready_proof(token, HELLO_NONCE, SESSION) == hmac_sha256_by_hand(token.encode(), ready_message)


def test_the_worked_example_in_docs_protocol_md_holds():
    assert hello_proof("s3cret", WELCOME_NONCE, SESSION) == (
        "46f54d87c4e44c103f80314cbcc6923e12edfe9e4947ca0169c0f35417c27f0f"
    )


def test_a_proof_is_lowercase_hex_and_binds_label_nonce_session_and_token():
    proof = hello_proof("s3cret", WELCOME_NONCE, SESSION)
    assert len(proof) == 64 and proof == proof.lower() and int(proof, 16) >= 0
    others = {
        ready_proof("s3cret", WELCOME_NONCE, SESSION),
        hello_proof("s3cret!", WELCOME_NONCE, SESSION),
        hello_proof("s3cret", HELLO_NONCE, SESSION),
        hello_proof("s3cret", WELCOME_NONCE, SESSION.replace("6", "7")),
    }
    assert proof not in others and len(others) == 4


def test_proof_matches_accepts_the_right_proof_in_either_hex_case():
    proof = ready_proof("s3cret", HELLO_NONCE, SESSION)
    assert proof_matches(proof, proof)
    assert proof_matches(proof, proof.upper())


@pytest.mark.parametrize("given", [None, 17, True, b"", [], {"auth": "x"}])
def test_proof_matches_rejects_non_strings(given):
    proof = ready_proof("s3cret", HELLO_NONCE, SESSION)
    assert not proof_matches(proof, given)
    if isinstance(given, bytes):
        assert not proof_matches(proof, proof.encode())


def test_proof_matches_rejects_wrong_proofs():
    proof = ready_proof("s3cret", HELLO_NONCE, SESSION)
    wrong = [
        "",
        proof[:-1],
        proof + "0",
        " " + proof,
        proof[:-1] + ("0" if proof[-1] != "0" else "1"),
        ready_proof("other", HELLO_NONCE, SESSION),
        hello_proof("s3cret", HELLO_NONCE, SESSION),
        "\ud800" * 64,
        "é" * 64,
    ]
    for candidate in wrong:
        assert not proof_matches(proof, candidate), candidate
