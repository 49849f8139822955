"""The one way to build a decoding session: `session_for(mode, edge, link, options)`.

Each session mode is one loop over the same parts (edge_runtime/parts.py): standalone, collaborative and
latency-aware in edge_runtime/loops.py, verified and verified-latency-aware in edge_runtime/verified.py,
cloud-only in edge_runtime/cloud_only.py. A new mode is its loop and a line in LOOPS below.
"""
from __future__ import annotations

from edge_runtime.cloud_only import CloudOnlySession
from edge_runtime.generation import TokenLoop
from edge_runtime.link import CloudLink
from edge_runtime.loops import CollaborativeSession, LatencyAwareSession, StandaloneSession
from edge_runtime.parts import EdgeSession, SessionOptions
from edge_runtime.policy import Mode, MODES
from edge_runtime.verified import VerifiedLatencyAwareSession, VerifiedSession
from plugin.split.edge import EdgePartition

LOOPS: dict[str, type[EdgeSession]] = {  # the modes that run the edge, by name
    "collaborative": CollaborativeSession,
    "standalone": StandaloneSession,
    "latency-aware": LatencyAwareSession,
    "verified": VerifiedSession,
    "verified-latency-aware": VerifiedLatencyAwareSession,
}
SESSION_MODES = MODES + tuple(name for name in LOOPS if name not in MODES)  # what session_for and --mode take


def network_mode(name: str) -> Mode:
    """How the session mode `name` treats the network: which model its link names, whether it falls back."""
    return LOOPS[name].mode if name in LOOPS else Mode.parse(name)


def session_for(mode: Mode | str, edge: EdgePartition | None, link: CloudLink | None,
                options: SessionOptions = SessionOptions()) -> TokenLoop:
    """A fresh session of `mode` (one of SESSION_MODES): cloud-only needs no edge, standalone no link."""
    name = mode.value if isinstance(mode, Mode) else mode
    if name == Mode.CLOUD_ONLY.value:
        return CloudOnlySession(link, options.sampler, options.eos_token_ids, options.sequence_id or 1,
                                options.max_block_rows)
    if name not in LOOPS:
        raise ValueError(f"mode must be one of {SESSION_MODES}, got {mode!r}")
    return LOOPS[name](edge, link, options)


def DecodingSession(edge: EdgePartition, link: CloudLink | None, mode: Mode | str = Mode.COLLABORATIVE,  # noqa: N802
                    **options) -> EdgeSession:
    """`session_for` with the options as keywords, for the tests and tools that build an edge session directly;
    `verify=True` names the verified flavour of collaborative or latency-aware."""
    mode = Mode.parse(mode)
    if not mode.uses_edge:
        raise ValueError(f"{mode.value} mode runs nothing on the edge: use CloudOnlySession")
    name = mode.value
    if options.pop("verify", False):
        if not mode.splits:
            raise ValueError(f"{mode.value} mode never asks the cloud: it cannot verify")
        name = "verified" if mode is Mode.COLLABORATIVE else f"verified-{mode.value}"
    return session_for(name, edge, link, SessionOptions(**options))
