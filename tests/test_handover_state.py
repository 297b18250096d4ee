"""The hand-over's pure parts: records (forward/handover.py) and the state a session carries to
another process (SessionCore, the QAP streams and ResumeState snapshots). The property that
matters: a session snapshotted at any byte of either stream and restored elsewhere goes on
exactly as it would have without the move."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forward import handover
from forward.handover import HandoverError, Listener
from forward.resume import PROTOCOL, ResumeError, ResumeState, parse_offer, ticket_token
from forward.session import SessionCore, State

from .test_session import ID_STRING, RESP_OK, Browser, head, request


def answer(msg_id: int, payload: bytes) -> bytes:
    return head(RESP_OK, len(payload), msg_id) + payload


def moved(core: SessionCore) -> tuple[SessionCore, Browser]:
    """`core` as another process restores it from its snapshot (through JSON, as it travels)."""
    browser = Browser()
    copy = SessionCore(browser.send)
    copy.restore(json.loads(json.dumps(core.snapshot())))
    return copy, browser


R_STREAM = ID_STRING + answer(1, b"a" * 40) + answer(2, b"") + answer(3, b"b" * 1000)
CLIENT_STREAM = request(1) + request(2, b"x" * 300) + request(3)


@given(st.integers(0, len(R_STREAM)), st.integers(0, len(CLIENT_STREAM)))
def test_a_session_moved_at_any_byte_goes_on_as_if_it_had_not(r_cut: int, c_cut: int) -> None:
    # The same bytes in the same order to a session that stays where it is.
    here = Browser()
    whole = SessionCore(here.send)
    whole.connected()
    to_r_whole = [bytes(p) for p in whole.from_browser(CLIENT_STREAM[:c_cut])]
    whole.from_r(R_STREAM[:r_cut])
    to_r_whole += [bytes(p) for p in whole.from_browser(CLIENT_STREAM[c_cut:])]
    whole.from_r(R_STREAM[r_cut:])

    there = Browser()
    core = SessionCore(there.send)
    core.connected()
    to_r = [bytes(p) for p in core.from_browser(CLIENT_STREAM[:c_cut])]
    core.from_r(R_STREAM[:r_cut])
    copy, moved_browser = moved(core)
    to_r += [bytes(p) for p in copy.from_browser(CLIENT_STREAM[c_cut:])]
    copy.from_r(R_STREAM[r_cut:])

    assert b"".join(to_r) == b"".join(to_r_whole)
    frames = there.frames + moved_browser.frames
    assert b"".join(f[1] for f in frames) == b"".join(f[1] for f in here.frames)
    # Message boundaries too: the same FIN bits at the same stream positions.
    assert [
        (len(b"".join(f[1] for f in frames[: i + 1])), f[2]) for i, f in enumerate(frames) if f[2]
    ] == [
        (len(b"".join(f[1] for f in here.frames[: i + 1])), f[2])
        for i, f in enumerate(here.frames)
        if f[2]
    ]
    assert copy.pending == whole.pending
    assert (copy.messages_to_r, copy.messages_from_r) == (
        whole.messages_to_r,
        whole.messages_from_r,
    )
    assert copy.mode == whole.mode and copy.state is State.OPEN


def test_a_snapshot_that_is_not_one_is_refused() -> None:
    core = SessionCore(Browser().send)
    core.connected()
    good = core.snapshot()
    for bad in (
        {**good, "pending": ["1"]},
        {**good, "state": "floating"},
        {**good, "to_r": "many"},
        {**good, "client": {**good["client"], "head": "00" * 16}},  # type: ignore[dict-item]
        {**good, "client": {**good["client"], "remaining": 5}},  # type: ignore[dict-item]
        {k: v for k, v in good.items() if k != "server"},
    ):
        with pytest.raises((ValueError, KeyError, TypeError)):
            SessionCore(Browser().send).restore(bad)


def test_resume_state_moves_with_its_tickets_counts_and_unacknowledged_bytes() -> None:
    state = ResumeState(4096, subject="CN=alice")
    ticket = state.issue()
    state.outbox.append(b"r" * 300)
    state.outbox.ack(100)
    state.received = 77
    copy = ResumeState.restored(json.loads(json.dumps(state.snapshot())), state.outbox.kept_bytes())
    assert copy.key == state.key and copy.subject == "CN=alice" and copy.received == 77
    assert (copy.outbox.acked, copy.outbox.sent) == (100, 300)
    assert copy.outbox.replay(150) == [b"r" * 150]
    copy.check(ticket[16:], "CN=alice")  # the ticket still works there
    with pytest.raises(ResumeError):
        copy.check(ticket[16:], "CN=mallory")
    with pytest.raises(ResumeError):
        copy.check("0" * 32, "CN=alice")
    snapshot = state.snapshot()
    assert ticket[16:] not in json.dumps(snapshot)  # only digests travel


@pytest.mark.parametrize(
    "change",
    [{"key": "not hex"}, {"window": 0}, {"received": -1}, {"told": 10**20}, {"acked": "x"}],
)
def test_a_resume_state_that_is_not_one_is_refused(change: dict[str, object]) -> None:
    state = ResumeState(4096)
    state.issue()
    with pytest.raises((ValueError, TypeError)):
        ResumeState.restored({**state.snapshot(), **change}, b"")


def test_records_round_trip_and_bad_ones_are_named() -> None:
    record = handover.decode(handover.encode("data", b"\x00\x01payload", n=1))
    assert (record.kind, record.meta, record.payload) == ("data", {"n": 1}, b"\x00\x01payload")
    for bad, why in (
        (b"\x00", "shorter than its length"),
        (b"\x00\x00\x00\x10{}", "shorter than its header"),
        (b"\x00\x00\x00\x02[]", "no known kind"),
        (b"\x00\x00\x00\x03{x}", "not JSON"),
        (b'\x00\x00\x00\x0f{"kind":"evil"}', "no known kind"),
    ):
        with pytest.raises(HandoverError, match=why):
            handover.decode(bad)
    with pytest.raises(ValueError):
        handover.encode("data", b"x" * handover.MAX_RECORD)
    assert [len(c) for c in handover.chunks(b"x" * 130_000)] == [61184, 61184, 7632]


def test_an_offer_this_forward_cannot_read_is_named() -> None:
    good = handover.decode(handover.offer("1.0", 1, []))
    assert handover.readable(good) is None
    newer = handover.decode(
        handover.encode("offer", format=handover.FORMAT, version=2, forward="2.0", listeners=[])
    )
    assert handover.readable(newer) == (
        "the running forward 2.0 hands over state version 2; this forward reads version 1"
    )
    other = handover.decode(handover.encode("offer", format="something", version=1))
    assert handover.readable(other) == "the offer is not a forward hand-over"


def test_listeners_must_be_the_ones_configured() -> None:
    handed = [Listener("http", "8080"), Listener("http", "8080"), Listener("ws", "8081")]
    wanted = handover.wanted_listeners({"http": 8080, "ws": 8081, "redirect": 0}, None, 0)
    assert handover.compare_listeners(handed, wanted) is None
    moved_port = handover.wanted_listeners({"http": 9090, "ws": 8081}, None, 0)
    assert handover.compare_listeners(handed, moved_port) == (
        "the running forward listens on 8080 (http), 8081 (ws); this one is configured for "
        "9090 (http), 8081 (ws): a hand-over keeps the listeners, so give the same ones "
        "(or restart)"
    )
    with_unix = handover.wanted_listeners({"http": 8080, "ws": 8081}, "/run/f.sock", 9000)
    assert handover.compare_listeners(handed, with_unix) is not None
    offer = handover.decode(handover.offer("1.0", 1, [x.describe() for x in handed]))
    assert handover.listeners_of(offer, 3) == handed
    with pytest.raises(HandoverError, match="names 3 listeners and carries 2"):
        handover.listeners_of(offer, 2)


def test_a_ticket_may_name_its_instance() -> None:
    key, secret = "0123456789abcdef", "ab" * 16
    plain = parse_offer([PROTOCOL, ticket_token(key + secret, 12)])
    assert (plain.key, plain.secret, plain.received, plain.instance) == (key, secret, 12, None)
    named = parse_offer([PROTOCOL, ticket_token(f"eu-2_{key}{secret}", 7)])
    assert (named.key, named.secret, named.received, named.instance) == (key, secret, 7, "eu-2")
    for bad in ("EU_", "-a_", "a.b_", "_", "x" * 33 + "_"):
        offer = parse_offer([PROTOCOL, ticket_token(bad + key + secret, 0)])
        assert offer.resuming and offer.key == "" and offer.instance is None, bad  # GONE
