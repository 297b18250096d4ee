"""The relay against a real Rserve, through both -p and -w (SPEC section 2)."""

from __future__ import annotations

import pytest

from forward import rexp
from forward.qap import Xt

from .conftest import Rserve, StartForward
from .rclient import RClient

pytestmark = pytest.mark.rserve

GREETING = "Rsrv0103QAP1\r\n\r\n--------------\r\n"


@pytest.mark.parametrize("listener", ["http", "ws"])
async def test_classic_eval(rserve_qap: Rserve, start_forward: StartForward, listener: str) -> None:
    fwd = await start_forward(rserve_qap.socket)
    async with await RClient.connect(fwd.url(listener)) as c:
        assert c.greeting == GREETING  # a str: it came as one TEXT frame
        value = await c.eval("1+1")
        assert (value.xt, value.value) == (Xt.ARRAY_DOUBLE, [2.0])
