"""What every decoding mode is made of: the options a session is built with (`SessionOptions`), and the parts
a mode that runs the edge decodes with (`EdgeSession`): the edge's sequence, the exit decider, the cloud's copy
of the context and the statistics. Each mode's loop is a subclass (edge_runtime/session.py lists them)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, TYPE_CHECKING

from edge_runtime.context_sync import CloudSequence, ContextSync
from edge_runtime.generation import SessionStats, TokenLoop, TokenRecord
from edge_runtime.link import CloudLink
from edge_runtime.policy import ExitDecider, LatencyPolicy, Mode
from plugin.model.sampling import Greedy, Sampler
from plugin.split.edge import EdgePartition, EdgeStep
from plugin.split.limits import Limits

if TYPE_CHECKING:
    from edge_runtime.verified import DraftLength


@dataclass(frozen=True)
class SessionOptions:
    """How a session decodes, whatever its mode: one value that EdgeApp, the CLI, the demo and the bench hand to
    `session_for`, so none of them repeats a keyword list. A mode ignores what it does not use."""

    threshold: float | None = None  # exit when the max softmax probability reaches it (None: the plan's)
    codec: str | None = None  # how layer-k rows travel (None: the plan's)
    sampler: Sampler | None = None  # None: greedy
    eos_token_ids: tuple[int, ...] = ()
    sequence_id: int | None = None  # the cloud's sequence id (None: 1; EdgeApp.session draws a random one)
    async_uploads: bool = False  # upload exited rows in the background
    latency: LatencyPolicy | None = None  # the latency-aware modes' budget (None: LatencyPolicy())
    max_block_rows: int = Limits.max_block_rows  # the cloud's rows-per-request limit
    speculate: bool = True  # collaborative, latency-aware: compute the next position while the cloud answers
    fidelity: bool = False  # collaborative, latency-aware: token requests also check the edge's own tokens
    draft_length: DraftLength | None = None  # verified modes: the gamma rule, copied per session (None: default)
    lookup_below: float | None = None  # verified modes: a draft less sure than this is looked up (None: the plan's)


def edge_record(step: EdgeStep) -> TokenRecord:
    """The record of a token an edge exit answered."""
    return TokenRecord(step.token_id, f"edge:{step.exit_layer}", step.confidences, step.rows_by_layer)


class EdgeSession(TokenLoop):
    """One generation that runs the edge, against one cloud sequence id in the modes that use the cloud.
    Subclasses give `step`, the mode's loop body, and `mode`, how it treats the network; `close` ENDs the cloud
    sequence."""

    mode: ClassVar[Mode]

    def __init__(self, edge: EdgePartition, link: CloudLink | None, options: SessionOptions):
        mode = self.mode
        if mode.uses_cloud and link is None:
            raise ValueError(f"{mode.value} mode needs a cloud link (--url)")
        if options.fidelity and not mode.splits:
            raise ValueError(f"{mode.value} mode never asks the cloud: it cannot check exits")
        self.edge, self.options = edge, options
        self.sequence_id = options.sequence_id or 1
        self.codec = options.codec or edge.plan.codec
        self.sampler = options.sampler or Greedy()
        self.eos = set(options.eos_token_ids)
        self.stats = SessionStats()
        threshold = edge.plan.threshold if options.threshold is None else options.threshold
        self.decider = ExitDecider(mode, threshold, options.latency)
        self.seq = edge.new_sequence()
        self.sync = None
        if mode.uses_cloud:
            sequence = CloudSequence(self.sequence_id, edge.plan.split_layer, self.codec, edge.hidden_size,
                                     options.max_block_rows)
            self.sync = ContextSync(link, sequence, self.stats, background=options.async_uploads,
                                    on_unreachable=self.decider.cloud_unreachable if mode.falls_back else None)

    @property
    def threshold(self) -> float:
        return self.decider.threshold

    def close(self, error: BaseException | None = None) -> None:
        """END the cloud sequence (with any rows it has not seen). `error` ended the generation (None: it
        finished); END's own failure never replaces it."""
        if self.sync is not None:
            self.sync.close(error)
