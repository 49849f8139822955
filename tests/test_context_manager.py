"""The context manager keeps each session's rows, and a bad request changes nothing it holds."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from plugin.protocol.codec import encode, to_array
from plugin.protocol.errors import ErrorCode, ProtocolError, SequenceNeedsStart
from plugin.protocol.messages import CloudRequest
from plugin.split.context import ContextManager
from plugin.split.limits import Limits

D = 16
KEY = 0x5E55_10_4E7  # every session of these tests is bound to this SESSION_KEY


def _req(sid, pos, n, want=False, start=False, end=False, split=None, codec="fp16", key=KEY):
    rows = encode(torch.arange(pos, pos + n, dtype=torch.float32)[:, None].expand(n, D), codec)
    return CloudRequest(sid, pos, want, rows=rows, split_layer=split if split else (3 if start else None),
                        start=start, end=end, session_key=key)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_uploads_accumulate_until_a_token_needs_them():
    cm = ContextManager(D, 6)
    assert cm.handle(_req(1, 0, 4, start=True)).rows.data.shape == (0, D)  # upload only: nothing to compute
    assert cm.handle(_req(1, 4, 2)).rows.data.shape == (0, D)
    block = cm.handle(_req(1, 6, 1, want=True))
    assert block.start_pos == 0 and block.split_layer == 3
    assert block.rows.data[:, 0].tolist() == list(range(7))  # all rows, in order, positions preserved
    block = cm.handle(_req(1, 7, 1, want=True))
    assert block.start_pos == 7 and block.rows.data.shape == (1, D)


@pytest.mark.parametrize("bad, error, message", [
    (_req(1, 5, 1), ProtocolError, "position gap"),
    (_req(1, 2, 1), ProtocolError, "position overlap"),
    (_req(2, 0, 1), SequenceNeedsStart, "START"),
    (_req(1, 4, 1, split=5), ProtocolError, "split layer"),
    (_req(1, 4, 0, want=False), None, None),  # an empty upload is fine
    (CloudRequest(1, 4, False, rows=encode(torch.ones(1, D + 1), "fp16"), session_key=KEY), ProtocolError, "shape"),
    (CloudRequest(1, 4, True, rows=encode(torch.full((1, D), float("nan")), "fp32"), session_key=KEY), ProtocolError,
     "NaN"),
    (_req(1, 4, 9), ProtocolError, "rows per request"),
    (_req(3, 0, 1, start=True, split=6), ProtocolError, "SPLIT_LAYER"),
])
def test_bad_requests_leave_stored_context_intact(bad, error, message):
    cm = ContextManager(D, 6, Limits(max_block_rows=8, max_context=64))
    cm.handle(_req(1, 0, 4, start=True))
    if error is None:
        cm.handle(bad)
    else:
        with pytest.raises(error, match=message):
            cm.handle(bad)
    block = cm.handle(_req(1, 4, 1, want=True))  # the next valid request still sees every row
    assert block.rows.data[:, 0].tolist() == [0, 1, 2, 3, 4]


def test_limits_on_sessions_and_context():
    cm = ContextManager(D, 6, Limits(max_sessions=2, max_context=10, max_block_rows=8))
    cm.handle(_req(1, 0, 8, start=True))
    cm.handle(_req(2, 0, 1, start=True))
    with pytest.raises(ProtocolError, match="too many live sessions"):
        cm.handle(_req(3, 0, 1, start=True))
    with pytest.raises(ProtocolError, match="exceeds the limit of 10"):
        cm.handle(_req(1, 8, 3))
    cm.handle(_req(2, 1, 0, end=True))  # END frees a slot
    cm.handle(_req(3, 0, 1, start=True))


def test_a_cloud_of_one_split_admits_that_split_only():
    """The TensorRT variant's context manager: its engine resumes at the plan's split layer and no other."""
    cm = ContextManager(D, 6, Limits(), min_split_layer=3, max_split_layer=3)
    for split in (2, 4, 5):
        with pytest.raises(ProtocolError, match=r"SPLIT_LAYER in \[3, 3\].*at layer 3 at the latest") as refused:
            cm.handle(_req(1, 0, 1, start=True, split=split))
        assert refused.value.code is ErrorCode.SPLIT_LAYER and not cm.sessions
    assert cm.handle(_req(1, 0, 1, start=True, split=3)).split_layer == 3


def test_ttl_expires_idle_sessions_and_restart_resets():
    clock = Clock()
    cm = ContextManager(D, 6, Limits(ttl_s=10), clock=clock)
    cm.handle(_req(1, 0, 3, start=True))
    clock.now = 5
    cm.handle(_req(2, 0, 1, start=True))
    clock.now = 12  # session 1 idle 12 s > 10 s; session 2 idle 7 s
    with pytest.raises(SequenceNeedsStart):
        cm.handle(_req(1, 3, 1))
    assert set(cm.sessions) == {2}
    cm.handle(_req(2, 0, 2, start=True))  # START again: a new sequence from position 0
    assert cm.handle(_req(2, 2, 1, want=True)).rows.data.shape[0] == 3


@pytest.mark.parametrize("codec", ["int8", "int8g", "fp16s"])
def test_int8_rows_round_trip_through_the_manager(codec):
    """The scaled codecs: rows kept as they arrived, widened with their scales when handed on."""
    cm = ContextManager(D, 6)
    block = cm.handle(_req(1, 0, 3, want=True, start=True, codec=codec))
    hidden = torch.from_numpy(to_array(block.rows))  # as the cloud partition decodes them
    torch.testing.assert_close(hidden[:, 0], torch.tensor([0.0, 1.0, 2.0]), atol=0.02, rtol=0)
    assert block.rows.codec == codec and np.isfinite(hidden.numpy()).all()


def test_a_start_no_request_follows_is_dropped_after_the_slot_idle_time_not_the_ttl():
    """A START the cloud partition refused after this manager took it leaves a session nobody will use (its edge
    got an error): dropped once Triton would have freed its slot, while a session in use keeps the TTL."""
    clock = Clock()
    cm = ContextManager(D, 6, Limits(slot_idle_s=5, ttl_s=600), clock=clock)
    cm.handle(_req(1, 0, 2, start=True))  # followed by a request: in use
    cm.handle(_req(2, 0, 2, start=True))  # never followed: a ghost
    clock.now = 1.0
    cm.handle(_req(1, 2, 1))
    clock.now = 5.5
    assert cm.expire() == [2] and set(cm.sessions) == {1}
    clock.now = 500.0
    assert cm.expire() == [] and set(cm.sessions) == {1}


def test_a_full_table_evicts_the_client_over_its_share_and_refuses_the_one_within_it():
    cm = ContextManager(D, 6, Limits(max_sessions=4))
    for sid in (1, 2, 3):
        cm.handle(_as(_req(sid, 0, 1, start=True), "mallory"))
    cm.handle(_as(_req(4, 0, 1, start=True), "alice"))
    cm.handle(_as(_req(5, 0, 1, start=True), "bob"))  # mallory holds 3 > 0 + 1: her least recent session goes
    assert set(cm.sessions) == {2, 3, 4, 5}
    with pytest.raises(ProtocolError) as refused:  # mallory holds 2, no one holds more than 3: she gets no more
        cm.handle(_as(_req(6, 0, 1, start=True), "mallory"))
    assert refused.value.code is ErrorCode.TOO_MANY_SESSIONS and set(cm.sessions) == {2, 3, 4, 5}


def _as(req: CloudRequest, client: str) -> CloudRequest:
    req.client = client
    return req


def test_a_new_session_on_a_live_id_is_told_an_earlier_session_may_hold_it():
    """After the front's replica list changes, an edge's new session can land where an old session of its id
    still lives: the refusal says so and what to do, not only "two clients on one id"."""
    cm = ContextManager(D, 6)
    cm.handle(_req(1, 0, 2, start=True))
    with pytest.raises(ProtocolError) as refused:
        cm.handle(_req(1, 0, 2, start=True, key=KEY + 1))
    assert refused.value.code is ErrorCode.SESSION_KEY
    assert "earlier session with this id still live" in str(refused.value) and "new sequence id" in str(refused.value)


def test_a_start_at_the_next_position_resumes_a_live_session_with_its_key():
    """Triton frees an idle sequence's slot (SLOT_EXPIRED) while the model keeps the session: the edge's START at
    the next position resumes it, rows and all; with another key it is refused, and where nothing is held it
    is a gap (the edge then re-sends the whole context)."""
    cm = ContextManager(D, 6)
    cm.handle(_req(1, 0, 3, start=True))
    block = cm.handle(_req(1, 3, 1, want=True, start=True))  # resumed: the 3 pending rows are still there
    assert block.start_pos == 0 and block.rows.data[:, 0].tolist() == [0, 1, 2, 3] and cm.sessions[1].confirmed
    with pytest.raises(ProtocolError) as refused:
        cm.handle(_req(1, 4, 1, start=True, key=KEY + 1))
    assert refused.value.code is ErrorCode.SESSION_KEY
    with pytest.raises(SequenceNeedsStart) as gap:
        cm.handle(_req(2, 4, 1, want=True, start=True))
    assert gap.value.code is ErrorCode.POSITION_GAP and 2 not in cm.sessions


def test_one_codec_per_session():
    """A session's pending rows cross the ensemble's hop as one block of its codec: another codec is refused
    (nothing changes), and a START may change it."""
    cm = ContextManager(D, 6)
    cm.handle(_req(1, 0, 2, start=True))
    with pytest.raises(ProtocolError, match="started with codec fp16, not int8") as err:
        cm.handle(_req(1, 2, 1, codec="int8"))
    assert err.value.code is ErrorCode.MALFORMED and cm.sessions[1].next_position == 2
    with pytest.raises(ProtocolError, match="started with codec fp16, not fp32"):  # a resumed START too
        cm.handle(_req(1, 2, 1, start=True, codec="fp32"))
    cm.handle(_req(1, 0, 2, start=True, codec="int8"))  # a re-START with another codec
    block = cm.handle(_req(1, 2, 1, want=True, codec="int8"))
    assert block.rows.codec == "int8" and block.rows.data.shape == (3, D) and block.rows.scale.shape == (3, 1)


def test_a_resumed_start_cannot_change_the_split_layer():
    """A START at a live session's next position resumes it (SLOT_EXPIRED): it may name the session's split layer,
    or none, but not another (found by tests/test_fuzz.py: such a START was accepted)."""
    cm = ContextManager(D, 6)
    cm.handle(_req(1, 0, 2, start=True))
    with pytest.raises(ProtocolError, match="started with split layer 3, not 5") as err:
        cm.handle(_req(1, 2, 1, start=True, split=5))
    assert err.value.code is ErrorCode.SPLIT_LAYER and cm.sessions[1].next_position == 2
    cm.handle(_req(1, 2, 1, start=True))  # its own split layer: resumed
    resumed = _req(1, 3, 1, want=True, start=True)
    resumed.split_layer = None  # as the edge resends a request after SLOT_EXPIRED
    assert cm.handle(resumed).rows.data.shape == (4, D)
