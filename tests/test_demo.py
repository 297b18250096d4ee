"""The demo's R side (demo/init.R) on a real Rserve in OCAP mode, reached through forward.

These pin down what the page relies on: the auth capability, the parseEval it returns, errors
as condition objects, and printed output / messages arriving as OOB sends before the answer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from forward.qap import Cmd, Xt
from forward.rexp import RObj, strings

from .conftest import Rserve, StartForward
from .rclient import RClient

DEMO = Path(__file__).resolve().parent.parent / "demo"

pytestmark = pytest.mark.rserve


@pytest.fixture
def demo_rserve(fresh_rserve: Callable[..., Rserve]) -> Rserve:
    return fresh_rserve(ocap=True, source=(DEMO / "init.R").read_text())


def oob_texts(client: RClient) -> list[tuple[str, str]]:
    out = []
    for reply in client.oob:
        assert reply.header.cmd & 0xFFFFF000 == Cmd.OOB_SEND
        stream, text = reply.value().value
        out.append((stream.value[0], text.value[0]))
    return out


async def login(client: RClient, user: str = "mike", password: str = "mypwd") -> RObj:
    return await client.call(client.capability, strings([user]), strings([password]))


async def test_wrong_password_is_refused(demo_rserve: Rserve, start_forward: StartForward) -> None:
    fwd = await start_forward(demo_rserve.socket)
    async with await RClient.connect(fwd.url()) as client:
        assert client.capability.attr("class") == strings(["OCref"])
        answer = await login(client, password="nope")
        assert answer == strings(["sorry, unauthorized!"])


async def test_parse_eval_answers_and_sends_output_first(
    demo_rserve: Rserve, start_forward: StartForward
) -> None:
    fwd = await start_forward(demo_rserve.socket)
    async with await RClient.connect(fwd.url()) as client:
        caps = (await login(client)).as_dict()
        parse_eval = caps["parseEval"]
        assert (await client.call(parse_eval, strings(["1+1"]))).value == [2.0]
        assert client.oob == []

        code = 'x <- 1:3; print("hello"); message("working"); warning("careful"); 7; sum(x)'
        answer = await client.call(parse_eval, strings([code]))
        assert answer == RObj(Xt.ARRAY_INT, [6])
        assert oob_texts(client) == [
            ("console.out", '[1] "hello"'),
            ("console.msg", "working"),
            ("console.err", "Warning: careful"),
            ("console.out", "[1] 7"),
        ]


async def test_errors_come_back_as_conditions_with_output_so_far(
    demo_rserve: Rserve, start_forward: StartForward
) -> None:
    fwd = await start_forward(demo_rserve.socket)
    async with await RClient.connect(fwd.url()) as client:
        parse_eval = (await login(client)).as_dict()["parseEval"]
        answer = await client.call(parse_eval, strings(['cat("partial\\n"); stop("boom")']))
        assert answer.attr("class") == strings(["simpleError", "error", "condition"])
        assert answer.as_dict()["message"] == strings(["boom"])
        assert oob_texts(client) == [("console.out", "partial")]

        client.oob.clear()
        syntax = await client.call(parse_eval, strings(["1 +* 2"]))
        assert "error" in syntax.attr("class").value  # type: ignore[union-attr]
        assert "unexpected" in syntax.as_dict()["message"].value[0]
        # The session survives both.
        # An invisible value (the assignment) is not printed.
        assert (await client.call(parse_eval, strings(["x <- 41; x + 1"]))).value == [42.0]
        assert client.oob == []
