"""What a person sees: streamed text coloured by where each token came from, and summary tables."""
from __future__ import annotations

import sys
from collections import Counter
from typing import TextIO

from edge_runtime.generation import Generation, TokenRecord

_COLOURS = ["\033[32m", "\033[36m", "\033[34m", "\033[35m"]  # edge exits, shallow to deep
_CLOUD, _FALLBACK, _RESET = "\033[33m", "\033[31m", "\033[0m"


class TokenPrinter:
    """Prints each token's text as soon as it decodes; byte-level BPE pieces wait until complete."""

    def __init__(self, tokenizer, exit_layers: tuple[int, ...], out: TextIO = sys.stdout, colour: bool | None = None):
        self.tokenizer, self.out = tokenizer, out
        self.colour = out.isatty() if colour is None else colour
        self.colours = {f"edge:{layer}": _COLOURS[i % len(_COLOURS)] for i, layer in enumerate(exit_layers)}
        self.ids: list[int] = []
        self.shown = ""

    def legend(self) -> str:
        if not self.colour:
            return ""
        parts = [f"{c}{name}{_RESET}" for name, c in self.colours.items()]
        return "tokens from: " + " ".join(parts + [f"{_CLOUD}cloud{_RESET}", f"{_FALLBACK}edge fallback or unverified{_RESET}"])

    def add(self, record: TokenRecord) -> None:
        self.ids.append(record.token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next piece
            return
        piece, self.shown = text[len(self.shown):], text
        if self.colour:
            c = _FALLBACK if record.fallback or record.unverified else self.colours.get(record.exit, _CLOUD)
            piece = f"{c}{piece}{_RESET}"
        self.out.write(piece)
        self.out.flush()


def exit_shares(gen: Generation) -> dict[str, float]:
    counts = Counter(gen.exits())
    return {name: counts[name] / max(1, len(gen.records)) for name in sorted(counts)}


def agreement_text(gen: Generation) -> str:
    """Per edge exit, how often its guess was the full model's token (live exit fidelity), or '-'."""
    agreement = gen.stats.exit_agreement()
    return ", ".join(f"{k} {v['rate']:.0%} of {v['checked']}" for k, v in agreement.items()) or "-"


def summary_table(rows: list[tuple[str, Generation]], baseline: str | None = None) -> str:
    """A Markdown table: one row per run, time per token relative to the baseline run's."""
    base = dict(rows).get(baseline) if baseline else None
    base_tpt = base.stats.wall_s / max(1, len(base.token_ids)) if base else None
    header = ("| run | tokens | exits (share) | cloud requests | bytes up | bytes down | ms/token | vs "
              f"{baseline or 'baseline'} | exits agreeing with the full model |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for name, gen in rows:
        n = max(1, len(gen.token_ids))
        tpt = gen.stats.wall_s / n
        shares = ", ".join(f"{k} {v:.0%}" for k, v in exit_shares(gen).items())
        rel = f"{tpt / base_tpt:.2f}x" if base_tpt else "-"
        lines.append(f"| {name} | {len(gen.token_ids)} | {shares} | {gen.stats.cloud_requests} | "
                     f"{gen.stats.bytes_up:,} | {gen.stats.bytes_down:,} | {1000 * tpt:.1f} | {rel} | "
                     f"{agreement_text(gen)} |")
    return header + "\n".join(lines) + "\n"
