"""The session's rules, pure: byte literals in, frames and bytes out, split at every offset."""

from __future__ import annotations

import struct

import pytest

from forward import qap
from forward.session import End, SessionCore, State
from forward.wsframe import CloseReason, Opcode

ID_STRING = b"Rsrv0103QAP1\r\n\r\n--------------\r\n"
# cmd, len, msg_id, len_hi: little-endian, as on the wire.
EVAL = 0x003
RESP_OK = 0x10001
OOB_MSG = 0x22000
IDLE = bytes.fromhex("00100200 14000000 00000000 00000000 0a100000 100c0000 22080000") + (
    b"idle\x00\x01\x01\x01"
)
NOTICE = bytes.fromhex("00100200 00000000 00000000 00000000")

Frame = tuple[int, bytes, bool]


def head(cmd: int, length: int, msg_id: int) -> bytes:
    return struct.pack("<IIII", cmd, length & 0xFFFFFFFF, msg_id, length >> 32)


def broken(msg_id: int) -> bytes:
    """RESP_ERR | ERR_conn_broken << 24, no payload, the request's msg_id."""
    return struct.pack("<IIII", 0x42010002, 0, msg_id, 0)


def request(msg_id: int, payload: bytes = b"1+1\x00") -> bytes:
    return head(EVAL, len(payload), msg_id) + payload


class Browser:
    """What the core sends the browser, one (opcode, payload, fin) per frame."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []

    def send(self, opcode: int, data: bytes | memoryview, fin: bool) -> None:
        self.frames.append((opcode, bytes(data), fin))

    def take(self) -> list[Frame]:
        frames, self.frames = self.frames, []
        return frames


def binary(data: bytes) -> Frame:
    return (Opcode.BINARY, data, True)


def opened(greeting: bytes = ID_STRING, **limits: int) -> tuple[SessionCore, Browser]:
    browser = Browser()
    core = SessionCore(browser.send, **limits)
    core.connected()
    core.from_r(greeting)
    browser.take()
    return core, browser


def to_r(core: SessionCore, data: bytes) -> bytes:
    return b"".join(bytes(piece) for piece in core.from_browser(data))


# -- the state and its transitions ---------------------------------------------------------------


def test_a_session_connects_opens_and_closes_once() -> None:
    browser = Browser()
    core = SessionCore(browser.send)
    assert core.state is State.CONNECTING
    assert core.from_browser(request(1)) == []  # nothing can go to R before it is connected
    core.connected()
    assert core.state is State.OPEN
    assert core.close() is True
    assert core.state is State.CLOSING
    assert core.close() is False  # the second close has nothing to do
    core.closed()
    core.closed()
    assert core.state is State.CLOSED
    assert core.close() is False
    assert browser.frames == []


def test_a_transition_that_does_not_exist_is_refused() -> None:
    core = SessionCore(Browser().send)
    core.connected()
    with pytest.raises(RuntimeError, match="from open to open"):
        core.connected()
    core.closed()
    with pytest.raises(RuntimeError, match="from closed to open"):
        core.connected()


def test_the_browser_leaving_while_r_is_connected_ends_the_session() -> None:
    core = SessionCore(Browser().send)
    core.closed()
    assert core.state is State.CLOSED
    assert core.from_r(ID_STRING) is None  # R's late greeting goes nowhere


# -- R -> browser ---------------------------------------------------------------------------------


def test_classic_greeting_is_one_text_frame_and_decides_the_mode() -> None:
    browser = Browser()
    core = SessionCore(browser.send)
    core.connected()
    assert core.awaiting_greeting
    assert core.from_r(ID_STRING[:20]) is None
    assert browser.frames == []
    assert core.from_r(ID_STRING[20:]) is qap.Mode.QAP
    assert browser.take() == [(Opcode.TEXT, ID_STRING, True)]
    assert not core.awaiting_greeting


def test_greeting_may_come_before_the_connection_is_taken() -> None:
    # R's first bytes can be read before the shell's connect returns: they are relayed.
    browser = Browser()
    core = SessionCore(browser.send)
    assert core.from_r(ID_STRING) is qap.Mode.QAP
    assert browser.take() == [(Opcode.TEXT, ID_STRING, True)]
    core.connected()
    assert core.state is State.OPEN and not core.awaiting_greeting


def test_ocap_greeting_is_a_binary_message() -> None:
    greeting = head(qap.Cmd.OC_INIT, 4, 0) + b"caps"
    browser = Browser()
    core = SessionCore(browser.send)
    core.connected()
    assert core.from_r(greeting) is qap.Mode.OCAP
    assert browser.take() == [binary(greeting)]


def test_a_whole_answer_leaves_as_a_view_of_what_was_read() -> None:
    frames: list[tuple[int, bytes | memoryview, bool]] = []
    core = SessionCore(lambda opcode, data, fin: frames.append((opcode, data, fin)))
    core.connected()
    core.from_r(ID_STRING)
    frames.clear()
    read = bytearray(head(RESP_OK, 3, 1) + b"abc")
    core.from_r(memoryview(read))
    [(opcode, data, fin)] = frames
    assert opcode == Opcode.BINARY and fin
    assert isinstance(data, memoryview) and data.obj is read  # no copy


ANSWER = head(RESP_OK, 10, 7) + b"0123456789"


@pytest.mark.parametrize("cut", range(1, len(ANSWER)))
def test_r_answer_split_at_every_offset_is_one_websocket_message(cut: int) -> None:
    core, browser = opened()
    assert to_r(core, request(7)) == request(7)
    assert core.pending == [7]
    core.from_r(ANSWER[:cut])
    core.from_r(ANSWER[cut:])
    frames = browser.take()
    # One message: a BINARY frame, then CONTINUATIONs; FIN on the last frame only.
    assert frames[0][0] == Opcode.BINARY
    assert all(opcode == Opcode.CONTINUATION for opcode, _, _ in frames[1:])
    assert [fin for _, _, fin in frames] == [False] * (len(frames) - 1) + [True]
    assert b"".join(data for _, data, _ in frames) == ANSWER
    # A header split in two is sent whole, with the payload after it.
    assert frames[0][1][:16] == ANSWER[:16]
    assert core.pending == []
    assert core.messages_from_r == 1


@pytest.mark.parametrize("cut", range(1, len(ID_STRING) + len(ANSWER)))
def test_greeting_and_answer_in_one_stream_split_at_every_offset(cut: int) -> None:
    stream = ID_STRING + ANSWER
    browser = Browser()
    core = SessionCore(browser.send)
    core.connected()
    modes = [core.from_r(stream[:cut]), core.from_r(stream[cut:])]
    assert modes.count(qap.Mode.QAP) == 1
    frames = browser.take()
    assert frames[0] == (Opcode.TEXT, ID_STRING, True)
    assert b"".join(data for _, data, _ in frames[1:]) == ANSWER
    assert frames[-1][2] is True


# -- browser -> R ---------------------------------------------------------------------------------


def test_requests_go_to_r_unchanged_and_wait_for_their_answers() -> None:
    batch = request(1) + request(2, b"x" * 40)
    for cut in range(len(batch) + 1):
        core, browser = opened()
        assert to_r(core, batch[:cut]) + to_r(core, batch[cut:]) == batch
        assert core.pending == [1, 2]
        assert core.messages_to_r == 2
    assert browser.frames == []


def test_oob_answers_from_the_browser_are_not_pending() -> None:
    core, browser = opened()
    to_r(core, request(1))  # a call; R asks the browser something while it runs
    core.from_r(head(OOB_MSG | 5, 4, 9) + b"ask?")
    answer = head(OOB_MSG | 5 | RESP_OK, 3, 9) + b"yes"
    assert to_r(core, answer) == answer
    assert core.pending == [1]  # the answer is not a request: R owes nothing for it
    browser.take()
    assert core.r_lost() is None
    assert browser.take() == [binary(broken(1))]


def test_nothing_goes_to_r_after_a_refused_header() -> None:
    core, browser = opened(max_message_size=10)
    too_big = head(EVAL, 11, 2) + b"x" * 11
    with pytest.raises(qap.MessageTooLarge) as info:
        core.from_browser(request(1, b"ok") + too_big)
    assert info.value.close_code is CloseReason.MESSAGE_TOO_BIG
    assert core.state is State.CLOSING
    assert core.from_browser(request(3, b"ok")) == []
    assert core.from_browser(too_big) == []
    assert core.from_r(head(RESP_OK, 0, 1)) is None
    assert core.heartbeat() is False
    assert browser.frames == []


# -- R lost ---------------------------------------------------------------------------------------


def test_r_closing_answers_every_pending_request_newest_first() -> None:
    core, browser = opened()
    to_r(core, request(1) + request(2) + request(3))
    core.from_r(head(RESP_OK, 0, 3))  # the innermost call returned
    browser.take()
    assert core.r_lost() is None
    assert core.state is State.R_GONE
    assert browser.take() == [binary(broken(2)), binary(broken(1))]
    assert core.pending == []


def test_once_r_is_gone_each_later_request_is_answered_when_complete() -> None:
    core, browser = opened()
    core.r_lost()
    later = request(8) + request(9, b"y" * 20)
    cut = len(request(8)) + 5
    assert core.from_browser(later[:cut]) == []
    assert browser.take() == [binary(broken(8))]
    assert core.from_browser(later[cut:]) == []
    assert browser.take() == [binary(broken(9))]
    assert core.heartbeat() is False  # no R, nothing to keep awake
    assert core.r_lost() is None  # said once
    assert browser.frames == []


def test_r_closing_inside_a_message_ends_the_session_without_answers() -> None:
    core, browser = opened()
    to_r(core, request(1))
    core.from_r(ANSWER[:20])
    browser.take()
    end = core.r_lost()
    assert end == End(
        CloseReason.INTERNAL_ERROR, "Rserve closed the connection in the middle of a message"
    )
    assert core.state is State.CLOSING
    assert browser.frames == []  # an answer of ours would land inside R's message


def test_r_closing_before_its_greeting_ends_the_session() -> None:
    browser = Browser()
    core = SessionCore(browser.send)
    core.connected()
    end = core.r_lost()
    assert end is not None and end.code is CloseReason.INTERNAL_ERROR
    assert "before its greeting" in end.reason
    assert browser.frames == []


def test_a_failed_write_to_r_gives_the_notice_then_the_answers() -> None:
    core, browser = opened()
    to_r(core, request(4) + request(5))
    assert core.r_write_failed() is None
    assert core.state is State.R_GONE
    assert browser.take() == [binary(NOTICE), binary(broken(5)), binary(broken(4))]


def test_a_failed_write_inside_r_answer_ends_the_session() -> None:
    core, browser = opened()
    to_r(core, request(4))
    core.from_r(ANSWER[:17])
    browser.take()
    end = core.r_write_failed()
    assert end is not None and end.code is CloseReason.INTERNAL_ERROR
    assert core.state is State.CLOSING
    assert browser.frames == []


def test_a_bad_greeting_answers_what_is_pending_then_closes() -> None:
    browser = Browser()
    core = SessionCore(browser.send)
    core.connected()
    to_r(core, request(1))  # the browser need not wait for the greeting
    with pytest.raises(qap.GreetingError) as info:
        core.from_r(b"HTTP/1.1 400 Bad Request\r\n")
    assert info.value.close_code is CloseReason.INTERNAL_ERROR
    assert core.state is State.CLOSING
    assert browser.take() == [binary(broken(1))]


def test_an_answer_over_the_limit_is_refused_on_its_header() -> None:
    core, browser = opened(max_result_size=5)
    to_r(core, request(1))
    with pytest.raises(qap.MessageTooLarge):
        core.from_r(head(RESP_OK, 6, 1) + b"abcdef")
    assert browser.take() == [binary(broken(1))]  # nothing of the answer, then the unwinding
    assert core.state is State.CLOSING


def test_no_greeting_in_time_gives_r_up() -> None:
    browser = Browser()
    core = SessionCore(browser.send)
    core.connected()
    to_r(core, request(1))
    assert core.no_greeting(0.3) == End(
        CloseReason.INTERNAL_ERROR, "Rserve sent no greeting within 0.3 s"
    )
    assert browser.take() == [binary(broken(1))]
    assert core.state is State.CLOSING
    core2, _ = opened()
    assert core2.no_greeting(0.3) is None  # it came


# -- frames of forward's own: only between two of R's messages --------------------------------


@pytest.mark.parametrize("cut", range(len(ANSWER) + 1))
def test_heartbeat_only_between_messages_never_inside_one(cut: int) -> None:
    core, browser = opened()
    core.from_r(ANSWER[:cut])
    inside = 0 < cut < len(ANSWER)
    assert core.heartbeat() is not inside
    core.from_r(ANSWER[cut:])
    frames = browser.take()
    idle = [i for i, frame in enumerate(frames) if frame == binary(IDLE)]
    if inside:
        assert idle == []
    else:
        # Before R's message or after it, never between its frames.
        assert idle in ([0], [len(frames) - 1])
    assert core.heartbeat() is True
    assert browser.take() == [binary(IDLE)]


def test_no_heartbeat_before_r_is_there_or_has_greeted() -> None:
    browser = Browser()
    core = SessionCore(browser.send)
    assert core.heartbeat() is False  # connecting
    core.connected()
    assert core.heartbeat() is False  # no greeting yet
    core.from_r(ID_STRING[:10])
    assert core.heartbeat() is False
    assert browser.frames == []


@pytest.mark.parametrize(("sent", "noticed"), [(b"", True), (ANSWER[:3], False), (ANSWER, True)])
def test_the_shutdown_notice_goes_only_between_messages(sent: bytes, noticed: bool) -> None:
    core, browser = opened()
    core.from_r(sent)
    browser.take()
    assert core.close(notice=True) is True
    assert browser.take() == ([binary(NOTICE)] if noticed else [])
    assert core.state is State.CLOSING


def test_an_answer_settles_the_request_with_its_msg_id() -> None:
    """A client that sends requests 1, 2 and 3 before reading: R answers 1; when R then goes,
    2 and 3 get ERR_conn_broken (newest first), not 1 and 2."""
    sent: list[tuple[int, bytes]] = []
    core = SessionCore(lambda op, data, fin: sent.append((op, bytes(data))))
    core.connected()
    core.from_r(b"Rsrv0103QAP1\r\n\r\n--------------\r\n")
    for mid in (1, 2, 3):
        core.from_browser(qap.Header(qap.Cmd.EVAL, 0, mid).encode())
    core.from_r(qap.Header(qap.Cmd.RESP_OK, 0, 1).encode())
    assert core.pending == [2, 3]
    sent.clear()
    assert core.r_lost() is None
    assert [p for _, p in sent] == [qap.conn_broken(3), qap.conn_broken(2)]
