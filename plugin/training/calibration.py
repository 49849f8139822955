"""How well each exit's confidence predicts its correctness, and what a threshold would do.

For every exit (and the final layer) over held-out windows: perplexity (a shortlist head's over its
S + 1 classes: a token outside the shortlist counts as "other"); per confidence bin the
count, the accuracy against the actual next token and the agreement with the final layer's argmax;
and for each threshold, the share of tokens that would exit at each exit under the CE-CoLLM rule
(the first exit whose confidence >= threshold; a threshold of 1.0 never exits) with the agreement
of those tokens with the final layer. Output: a dict (JSON), Markdown tables and a PNG.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from plugin.model.decoder import DecoderModel, exit_decision
from plugin.training.exit_heads import exit_forward

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


@dataclass
class TokenStats:
    """Per scored token, per output (exits in order, then the final layer): [O, N] tensors."""

    layers: tuple[int, ...]  # exit layers, then the model's depth for the final layer
    confidence: torch.Tensor  # [O, N] float64, max softmax probability
    token: torch.Tensor  # [O, N] int64, argmax
    nll: torch.Tensor  # [O, N] float64, -log p(actual next token)
    target: torch.Tensor  # [N] int64, the actual next token

    @property
    def exit_layers(self) -> tuple[int, ...]:
        return self.layers[:-1]


@torch.no_grad()
def collect(model: DecoderModel, windows: torch.Tensor | list[torch.Tensor], exit_layers: tuple[int, ...],
            batch_size: int = 8, progress=None, first_scored: list[int] | None = None) -> TokenStats:
    """Run the model over windows [W, T] (or a list of sequences [T_i], one pass each) and keep, per
    output, every scored token's statistics.

    Exit logits come from `model.exit_logits`, i.e. with whatever exit heads the model was loaded
    with, and the token and confidence from `exit_decision`, exactly as the edge computes them.
    first_scored: per sequence of a list, the first position scored (e.g. a continuation's last
    prompt row: the positions the model generated from); default every position.
    """
    if first_scored is not None and (isinstance(windows, torch.Tensor) or len(first_scored) != len(windows)):
        raise ValueError("first_scored needs a list of sequences, one start per sequence")
    n_layers = model.cfg.num_layers
    layers = tuple(exit_layers) + (n_layers,)
    token_ids = [model.exit_token_ids(e) for e in exit_layers] + [None]
    conf, tok, nll, tgt = [], [], [], []
    batches = ([windows[i:i + batch_size] for i in range(0, windows.shape[0], batch_size)]
               if isinstance(windows, torch.Tensor) else [w[None] for w in windows])
    for b, ids in enumerate(batches):
        hidden, final = exit_forward(model, ids, tuple(exit_layers))
        start = first_scored[b] if first_scored is not None else 0
        outputs = [model.exit_logits(hidden[e], e).float() for e in exit_layers] + [final]
        target = ids[:, start + 1:].reshape(-1).to(final.device)  # [n]
        c_rows, t_rows, n_rows = [], [], []
        for logits, head_ids in zip(outputs, token_ids):
            logits = logits[:, start:-1].reshape(-1, logits.shape[-1])  # [n, C]
            c, t = exit_decision(logits, head_ids)
            c_rows.append(c.double().cpu())
            t_rows.append(t.cpu())
            n_rows.append(F.cross_entropy(logits, _classes(target, head_ids, logits.shape[-1]),
                                          reduction="none").double().cpu())
        conf.append(torch.stack(c_rows))
        tok.append(torch.stack(t_rows))
        nll.append(torch.stack(n_rows))
        tgt.append(target.cpu())
        if progress is not None:
            progress(ids.shape[0])
    return TokenStats(layers, torch.cat(conf, 1), torch.cat(tok, 1), torch.cat(nll, 1), torch.cat(tgt))


def _classes(target: torch.Tensor, head_ids: torch.Tensor | None, width: int) -> torch.Tensor:
    """The head's class of each target token: itself for a full head; for a shortlist head its index,
    or the last ("other") class when it lies outside."""
    if head_ids is None:
        return target
    class_of = torch.full((int(max(target.max(), head_ids.max())) + 1,), width - 1, dtype=torch.long)
    class_of[head_ids] = torch.arange(len(head_ids))
    return class_of[target]


def exit_assignment(conf: torch.Tensor, threshold: float) -> torch.Tensor:
    """Index of the exit each token leaves at (the first with confidence >= threshold), or E for the cloud.

    conf: [E, N] confidences of the edge exits only. A threshold of 1.0 never exits (exact mode).
    """
    E, N = conf.shape
    if threshold >= 1.0:
        return torch.full((N,), E, dtype=torch.long)
    passes = conf >= threshold  # [E, N]
    first = torch.where(passes.any(0), passes.float().argmax(0), torch.full((N,), E))
    return first.long()


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def report(stats: TokenStats, bins: int = 10, thresholds: tuple[float, ...] = THRESHOLDS) -> dict:
    """The calibration report as a JSON-ready dict (see the module docstring)."""
    O, N = stats.confidence.shape
    final_token = stats.token[-1]
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    outputs = {}
    for o, layer in enumerate(stats.layers):
        name = f"exit_{layer}" if o < O - 1 else f"final_{layer}"
        c = stats.confidence[o]
        correct = (stats.token[o] == stats.target).double()
        agree = (stats.token[o] == final_token).double()
        idx = torch.clamp((c * bins).floor().long(), max=bins - 1)  # confidence 1.0 in the last bin
        rows, ece = [], 0.0
        for b in range(bins):
            m = idx == b
            n = int(m.sum())
            row = {"lo": round(float(edges[b]), 4), "hi": round(float(edges[b + 1]), 4), "count": n,
                   "share": n / N, "mean_confidence": _ratio(float(c[m].sum()), n),
                   "accuracy": _ratio(float(correct[m].sum()), n), "agreement": _ratio(float(agree[m].sum()), n)}
            if n:
                ece += n / N * abs(row["accuracy"] - row["mean_confidence"])
            rows.append(row)
        loss = float(stats.nll[o].mean())
        outputs[name] = {"layer": layer, "loss": loss, "ppl": math.exp(loss), "accuracy": float(correct.mean()),
                         "agreement": float(agree.mean()), "mean_confidence": float(c.mean()), "ece": ece,
                         "bins": rows}
    return {"tokens": N, "exit_layers": list(stats.exit_layers), "num_layers": stats.layers[-1],
            "outputs": outputs, "thresholds": [threshold_row(stats, t) for t in thresholds]}


def threshold_row(stats: TokenStats, threshold: float) -> dict:
    """Shares of tokens exiting at each exit / going to the cloud, and their agreement with the final layer."""
    E = len(stats.exit_layers)
    N = stats.confidence.shape[1]
    where = exit_assignment(stats.confidence[:E], threshold)  # [N] in [0, E]
    final_token = stats.token[-1]
    emitted = stats.token.gather(0, where[None])[0]  # the exit's token, or the final layer's for the cloud
    share, agreement = {}, {}
    for j, e in enumerate(stats.exit_layers):
        m = where == j
        share[str(e)] = float(m.sum()) / N
        agreement[str(e)] = _ratio(float((stats.token[j][m] == final_token[m]).sum()), float(m.sum()))
    edge = where < E
    return {
        "threshold": threshold,
        "exit_share": share,  # per exit layer
        "edge_share": float(edge.sum()) / N,
        "cloud_share": float((~edge).sum()) / N,
        "exit_agreement": agreement,  # of the tokens exiting there, share equal to the final argmax
        "edge_agreement": _ratio(float((emitted[edge] == final_token[edge]).sum()), float(edge.sum())),
        "wrong_exit_share": float((emitted[edge] != final_token[edge]).sum()) / N,  # of all tokens
        "token_agreement": float((emitted == final_token).double().mean()),  # all tokens, cloud ones agree
        "token_accuracy": float((emitted == stats.target).double().mean()),
    }


THRESHOLD_GRID = tuple(round(0.30 + 0.01 * i, 2) for i in range(71))  # 0.30 .. 1.00: the plot's and the pick's


def agreeing(target: float) -> Callable[[dict], bool]:
    """A threshold rule: the tokens leaving at the exits agree with the final layer at least `target` of the time."""
    return lambda row: row["edge_agreement"] is not None and row["edge_agreement"] >= target


def wrong_at_most(share: float) -> Callable[[dict], bool]:
    """A threshold rule: at most `share` of all tokens leave at an exit with another token than the final layer's.
    In free generation such an exit changes every later token, so this bounds the generations that diverge: at
    0.001 (0.1 per 100 tokens) about one 96-token generation in ten does, half-way on average, which keeps 95% of
    positions equal to the full model's."""
    return lambda row: row["wrong_exit_share"] <= share


def pick_threshold(stats: TokenStats, rule: Callable[[dict], bool], grid: tuple[float, ...] = THRESHOLD_GRID) -> float:
    """The lowest threshold of `grid` whose row (`threshold_row`) on these positions meets `rule` (1.0, which never
    exits, when none does). Pick on one set of positions and report on another: on the set it was picked on, a
    threshold meets its rule by construction."""
    for threshold in sorted(grid):
        if rule(threshold_row(stats, threshold)):
            return threshold
    return 1.0


def share_curve(stats: TokenStats, thresholds: list[float]) -> dict[str, list[float]]:
    """Exit shares on a fine threshold grid, for the plot."""
    rows = [threshold_row(stats, t) for t in thresholds]
    curve = {e: [r["exit_share"][str(e)] for r in rows] for e in map(str, stats.exit_layers)}
    curve["cloud"] = [r["cloud_share"] for r in rows]
    curve["token_agreement"] = [r["token_agreement"] for r in rows]
    return curve


# ----------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------


def percent(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def markdown(rep: dict, title: str = "Exit calibration") -> str:
    """Markdown tables: summary per output, the exit rule per threshold, reliability bins per output."""
    exits = rep["exit_layers"]
    lines = [f"# {title}", ""]
    meta = rep.get("meta", {})
    if meta:
        lines += [f"- {k}: {v}" for k, v in meta.items()] + [""]
    lines += [f"{rep['tokens']:,} scored tokens. Accuracy: argmax == actual next token. Agreement: argmax == "
              "the final layer's argmax. ECE: expected calibration error of confidence vs accuracy.", "",
              "## Per output", "",
              "| output | perplexity | accuracy | agreement with final | mean confidence | ECE |",
              "|---|---|---|---|---|---|"]
    for name, r in rep["outputs"].items():
        label = f"exit after layer {r['layer']}" if name.startswith("exit") else f"final layer ({r['layer']})"
        lines.append(f"| {label} | {r['ppl']:.2f} | {percent(r['accuracy'])} | {percent(r['agreement'])} | "
                     f"{r['mean_confidence']:.3f} | {r['ece']:.3f} |")
    lines += ["", "## Exit rule per threshold", "",
              "A token exits at the first exit whose confidence >= threshold (1.0 never exits); the others "
              "go to the cloud. Share: of all tokens. Agreement: of the tokens exiting there, the share whose "
              "token equals the final layer's. Wrong per 100: exits with another token than the final layer's, "
              "per 100 tokens (each changes every later token of a free generation). Emitted agreement/accuracy: "
              "over all tokens, the emitted token (the exit's, or the final layer's for cloud tokens).", ""]
    head = ["threshold"] + [f"exit {e} share" for e in exits] + ["edge share", "cloud share"]
    head += [f"exit {e} agreement" for e in exits] + ["edge agreement", "wrong per 100", "emitted agreement",
                                                       "emitted accuracy"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in rep["thresholds"]:
        cells = [f"{t['threshold']:g}"] + [percent(t["exit_share"][str(e)]) for e in exits]
        cells += [percent(t["edge_share"]), percent(t["cloud_share"])]
        cells += [percent(t["exit_agreement"][str(e)]) for e in exits]
        cells += [percent(t["edge_agreement"]), f"{100 * t['wrong_exit_share']:.2f}", percent(t["token_agreement"]),
                  percent(t["token_accuracy"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Reliability per confidence bin", ""]
    for name, r in rep["outputs"].items():
        label = f"Exit after layer {r['layer']}" if name.startswith("exit") else f"Final layer ({r['layer']})"
        lines += [f"### {label}", "", "| confidence | tokens | share | mean confidence | accuracy | agreement with final |",
                  "|---|---|---|---|---|---|"]
        for b in r["bins"]:
            mc = "-" if b["mean_confidence"] is None else f"{b['mean_confidence']:.3f}"
            lines.append(f"| [{b['lo']:.1f}, {b['hi']:.1f}{']' if b['hi'] >= 1 else ')'} | {b['count']:,} | "
                         f"{percent(b['share'])} | {mc} | {percent(b['accuracy'])} | {percent(b['agreement'])} |")
        lines.append("")
    return "\n".join(lines)


def plot(rep: dict, curve: dict, grid: list[float], path: str | Path, title: str = "Exit calibration") -> None:
    """reliability.png: confidence vs accuracy, confidence vs agreement, exit share vs threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.8), constrained_layout=True)
    colors = plt.get_cmap("viridis")
    names = list(rep["outputs"])
    color = {n: colors(0.85 * i / max(1, len(names) - 1)) for i, n in enumerate(names)}
    for ax, key, ylabel in [(axes[0], "accuracy", "accuracy (argmax == next token)"),
                            (axes[1], "agreement", "agreement with the final layer")]:
        ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1,
                label="perfect calibration" if key == "accuracy" else f"{key} = confidence")
        for name in names:
            if key == "agreement" and name.startswith("final"):
                continue
            r = rep["outputs"][name]
            pts = [(b["mean_confidence"], b[key]) for b in r["bins"] if b["count"] >= 20]
            if not pts:
                continue
            xs, ys = zip(*pts)
            label = (f"exit {r['layer']}" if name.startswith("exit") else f"final ({r['layer']})")
            label += f"  ppl {r['ppl']:.1f}" + (f", ECE {r['ece']:.3f}" if key == "accuracy" else "")
            ax.plot(xs, ys, marker="o", color=color[name], label=label)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (max softmax probability), bin mean")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left" if key == "accuracy" else "lower right", fontsize=9)
    axes[0].set_title("Reliability: confidence vs accuracy")
    axes[1].set_title("Confidence vs agreement with the final layer")

    ax = axes[2]
    exits = [str(e) for e in rep["exit_layers"]]
    ax.stackplot(grid, *[curve[e] for e in exits], labels=[f"exits at layer {e}" for e in exits],
                 colors=[color[f"exit_{e}"] for e in exits], alpha=0.8)
    edge_max = max(sum(curve[e][i] for e in exits) for i in range(len(grid)))
    ax.set_xlim(min(grid), 1)
    ax.set_ylim(0, max(0.05, 1.1 * edge_max))
    ax.set_xlabel("threshold (exit when confidence >= threshold; 1.0 never exits)")
    ax.set_ylabel("share of tokens exiting at each exit (stacked)")
    ax.set_title("Exit share vs threshold (the rest go to the cloud)")
    ax.grid(alpha=0.3)
    twin = ax.twinx()  # agreement lives near 1: its own axis keeps both readable
    agreement = curve["token_agreement"]
    twin.plot(grid, agreement, color="crimson", linewidth=2, label="emitted tokens agreeing with final (right axis)")
    low = min(agreement)
    twin.set_ylim(max(0.0, low - 0.1 * (1 - low) - 0.005), 1.0005)
    twin.set_ylabel("emitted tokens agreeing with the final layer", color="crimson")
    twin.tick_params(axis="y", colors="crimson")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + twin.get_legend_handles_labels()[1]
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=9)
    fig.suptitle(title, fontsize=12)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(stats: TokenStats, out_dir: str | Path, bins: int = 10,
                  thresholds: tuple[float, ...] = THRESHOLDS, meta: dict | None = None,
                  title: str = "Exit calibration") -> dict:
    """calibration.json + calibration.md + reliability.png in out_dir; returns the report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rep = report(stats, bins, thresholds)
    if meta:
        rep = {"meta": meta, **rep}
    grid = list(THRESHOLD_GRID)
    curve = share_curve(stats, grid)
    (out_dir / "calibration.json").write_text(json.dumps(rep, indent=2) + "\n")
    (out_dir / "calibration.md").write_text(markdown(rep, title) + "\n")
    plot(rep, curve, grid, out_dir / "reliability.png", title)
    return rep


def headline(rep: dict, thresholds: tuple[float, ...] = (0.8, 0.9)) -> str:
    """One line per exit: perplexity, agreement of its exiting tokens at the thresholds, share exiting."""
    rows = {t["threshold"]: t for t in rep["thresholds"]}
    parts = []
    for name, r in rep["outputs"].items():
        s = f"{name}: ppl {r['ppl']:.2f}"
        if name.startswith("exit"):
            e = str(r["layer"])
            for t in thresholds:
                if t in rows:
                    s += f", @{t:g} share {percent(rows[t]['exit_share'][e])} agree {percent(rows[t]['exit_agreement'][e])}"
        parts.append(s)
    return "; ".join(parts)
