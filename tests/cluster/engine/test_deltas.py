"""Streamed deltas carry exactly the tokens each step appended, in order, when a request has several
events in one step: a request admitted into a busy AR lane gets its prefill token and, in the same
step, the lane's decode token."""

from __future__ import annotations

import pytest

from twotower.cluster.engine.request import Resume

from .test_engine import P, Towers


@pytest.fixture(scope="module")
def tw() -> Towers:
    return Towers()


@pytest.mark.parametrize("resume", [False, True])
def test_a_request_joining_a_busy_lane_streams_every_token_once(tw, resume):
    eng = tw.engine()
    params = P(mode="ar", max_tokens=12, logprobs=True)
    first = eng.add_request("busy lane", params)
    for _ in range(3):
        eng.step()
    ahead = Resume([70, 71], [-1.0, -2.0], 0) if resume else None
    late = eng.add_request("joins later", params, resume=ahead)
    deltas = []
    while eng.has_unfinished():
        deltas += [o for o in eng.step() if o.request_id == late.request_id]
    streamed = ([70, 71] if resume else []) + [t for o in deltas for t in o.new_token_ids]
    assert streamed == late.output_ids and len(late.output_ids) == 12
    lps = ([-1.0, -2.0] if resume else []) + [x for o in deltas for x in o.logprobs]
    assert lps == late.output_logprobs
    assert len(deltas[0].new_token_ids) == 2  # the prefill token and the same step's decode token
    assert first.finished
