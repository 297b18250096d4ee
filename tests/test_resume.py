"""forward/resume.py: the offer, tickets, control messages and the outbox, as pure functions and
byte literals (the protocol is docs/resume.md)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forward.resume import (
    PROTOCOL,
    Ack,
    Outbox,
    ResumeClose,
    ResumeError,
    ResumeState,
    parse_control,
    parse_offer,
    ticket_token,
)

TICKET = "0123456789abcdef" + "f" * 32


def test_offer_without_resume_is_only_the_applications() -> None:
    offer = parse_offer(["app.v2", "other"])
    assert not offer.resume and not offer.resuming and offer.others == ("app.v2", "other")
    # A ticket without the protocol is not a resume.
    assert not parse_offer([ticket_token(TICKET, 5)]).resuming


def test_offer_with_resume_and_a_ticket() -> None:
    offer = parse_offer(["app.v2", PROTOCOL, ticket_token(TICKET, 123456)])
    assert offer.resume and offer.resuming
    assert (offer.key, offer.secret, offer.received) == (TICKET[:16], TICKET[16:], 123456)
    assert offer.others == ("app.v2",)


@pytest.mark.parametrize(
    "token",
    [
        "rserve-ticket.",
        "rserve-ticket.xyz.1",
        f"rserve-ticket.{TICKET}",
        f"rserve-ticket.{TICKET}.",
        f"rserve-ticket.{TICKET}.-1",
        f"rserve-ticket.{TICKET}.1e3",
        f"rserve-ticket.{TICKET}.{2**53 + 1}",
        f"rserve-ticket.{TICKET.upper()}.1",
        f"rserve-ticket.{TICKET}0.1",
    ],
)
def test_a_malformed_ticket_resumes_nothing(token: str) -> None:
    offer = parse_offer([PROTOCOL, token])
    assert offer.resuming  # asked to resume: the answer is GONE, not a new session
    assert offer.key == "" and offer.received == 0


def test_tickets_are_one_time_with_a_grace_for_the_one_in_flight() -> None:
    state = ResumeState(window=1024)
    first = state.issue()
    assert len(first) == 48 and first.startswith(state.key)
    state.check(first[16:], None)
    second = state.issue()  # a resume
    assert second != first and second.startswith(state.key)
    state.check(second[16:], None)
    state.check(first[16:], None)  # the client may not have the new one yet
    state.settled()  # it acknowledged on the new connection
    with pytest.raises(ResumeError) as info:
        state.check(first[16:], None)
    assert info.value.code == ResumeClose.GONE
    third = state.issue()
    forged = second[:-1] + ("1" if second[-1] == "0" else "0")  # never the ticket itself
    for old in (first, forged):
        with pytest.raises(ResumeError):
            state.check(old[16:], None)
    state.check(third[16:], None)


def test_a_session_with_a_certificate_resumes_only_with_that_subject() -> None:
    state = ResumeState(window=1024, subject="CN=alice")
    ticket = state.issue()
    state.check(ticket[16:], "CN=alice")
    for other in ("CN=bob", None):
        with pytest.raises(ResumeError) as info:
            state.check(ticket[16:], other)
        assert info.value.code == ResumeClose.REFUSED


def test_control_messages() -> None:
    state = ResumeState(window=4096)
    ticket = state.issue()
    assert json.loads(state.opened(ticket, 120.0)) == {
        "t": "open",
        "ticket": ticket,
        "window": 4096,
        "grace": 120.0,
    }
    state.received = 77
    assert json.loads(state.resumed(ticket, 5)) == {
        "t": "resumed",
        "ticket": ticket,
        "window": 4096,
        "grace": 5,
        "received": 77,
    }
    assert not state.ack_due()
    state.received += 1024
    assert state.ack_due()
    assert state.ack() == b'{"t":"ack","received":1101}' and not state.ack_due()
    assert parse_control(b'{"t":"ack","received":12,"later":"ignored"}') == Ack(12)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"ack",
        b"[]",
        b'{"t":"open"}',
        b'{"t":"ack"}',
        b'{"t":"ack","received":-1}',
        b'{"t":"ack","received":1.5}',
        b'{"t":"ack","received":true}',
        b'{"t":"ack","received":"1"}',
        b'{"t":"ack","received":9007199254740993}',
        b'{"t":"ack","received":1,"pad":"' + b"x" * 5000 + b'"}',
    ],
)
def test_bad_control_messages_close_with_1008(payload: bytes) -> None:
    with pytest.raises(ResumeError) as info:
        parse_control(payload)
    assert info.value.code == 1008


def test_outbox_keeps_copies_until_acknowledged() -> None:
    box = Outbox(limit=8)
    shared = bytearray(b"abcdef")
    kept = box.append(memoryview(shared)[:4])
    shared[:] = b"XXXXXX"  # the shared read buffer is reused
    assert kept == b"abcd" and box.replay(0) == [b"abcd"]
    box.append(b"efghij")
    assert box.full and box.kept == 10
    assert box.replay(2) == [b"cd", b"efghij"]
    assert box.kept == 8 and box.full
    box.ack(4)
    assert box.kept == 6 and not box.full
    box.ack(10)
    assert box.replay(10) == [] and box.kept == 0
    for bad in (9, 11):
        with pytest.raises(ResumeError):
            box.ack(bad)


@given(
    chunks=st.lists(st.binary(min_size=0, max_size=40), max_size=12),
    acks=st.lists(st.integers(min_value=0, max_value=500), max_size=6),
)
def test_replay_from_any_count_is_exactly_the_rest(chunks: list[bytes], acks: list[int]) -> None:
    box = Outbox(limit=1 << 20)
    stream = b"".join(chunks)
    for c in chunks:
        box.append(c)
    done = 0
    for a in sorted(acks):
        point = min(a, len(stream))
        point = max(point, done)
        assert b"".join(box.replay(point)) == stream[point:]
        done = point
