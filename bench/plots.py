"""The benchmark's PNG plots (matplotlib, Agg backend: no display needed), one function per plot."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PLOTS = {
    "quality": "quality_vs_cloud_share.png",
    "latency": "time_per_token_vs_link.png",
    "bytes": "bytes_up_per_token.png",
    "clients": "clients_p99_throughput.png",
}


def _order(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["key"] for r in rows))


def _target_link(results: dict) -> str:
    targets = results.get("targets") or []
    if targets:
        return targets[0]["link"]
    return min(results["links"], key=lambda l: abs(l["rtt_ms"] - 20))["name"]


# -- plots ------------------------------------------------------------------------------------------
def plot_quality(results: dict, path: Path) -> None:
    rows = [r for r in results["runs"] if r["link"] == results["links"][0]["name"]]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), sharex=True)
    styles = {"fp16": dict(marker="o", markersize=9), "int8": dict(marker="s", markersize=5, markerfacecolor="none"),
              "fp32": dict(marker="^", markersize=7)}
    panels = ((axes[0], "token_agreement", "token agreement with cloud-only"),
              (axes[1], "rouge_l", "ROUGE-L F1 vs cloud-only"),
              (axes[2], "perplexity", "full-model perplexity of chosen tokens"))
    for ax, metric, label in panels:
        for codec in dict.fromkeys(r["codec"] for r in rows if r["system"] == "collaborative"):
            pts = sorted((r["cloud_share"], r[metric], r["threshold"]) for r in rows
                         if r["system"] == "collaborative" and r["codec"] == codec and r.get(metric) is not None)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"collaborative {codec}",
                    **styles.get(codec, dict(marker="o")))
            if codec == next(iter(styles)) or len(styles) == 1:
                for x, y, t in pts:
                    ax.annotate(f"{t:g}", (x, y), textcoords="offset points", xytext=(-4, -16), fontsize=8)
        for r in rows:
            if r["system"] in ("standalone", "cloud-only", "naive-split", "verified") and r.get(metric) is not None:
                ax.scatter([r["cloud_share"]], [r[metric]], marker="x", s=60, label=r["key"], zorder=3)
        ax.set_xlabel("share of tokens resolved by the cloud")
        ax.set_ylabel(label)
        ax.set_xlim(-0.05, 1.05)
        if metric != "perplexity":
            ax.set_ylim(-0.02, 1.08)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("Quality vs cloud share per threshold (point labels: threshold; same for every link)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency(results: dict, path: Path) -> None:
    """Grouped bars: one group per link, one bar per system (mean), dot at the median, whisker to p90."""
    rows = results["runs"]
    links = [l["name"] for l in results["links"]]
    keys = _order(rows)
    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.85 / max(1, len(keys))
    for k, key in enumerate(keys):
        mine = {r["link"]: r for r in rows if r["key"] == key}
        xs = [i for i, l in enumerate(links) if l in mine]
        mean = [mine[links[i]]["time_per_token_ms"]["mean"] for i in xs]
        med = [mine[links[i]]["time_per_token_ms"]["median"] for i in xs]
        p90 = [mine[links[i]]["time_per_token_ms"]["p90"] for i in xs]
        pos = [x + (k - (len(keys) - 1) / 2) * width for x in xs]
        hatch = "//" if key == "cloud-only" or key.startswith("naive") else None
        ax.bar(pos, mean, width=width * 0.95, label=key, hatch=hatch, edgecolor="white", color=f"C{k % 10}")
        ax.errorbar(pos, med, yerr=[[0] * len(med), [max(0.0, b - a) for a, b in zip(med, p90)]], fmt="o",
                    color="black", markersize=2.5, elinewidth=0.8, capsize=1.5)
    ax.set_xticks(range(len(links)), links, fontsize=9)
    ax.set_ylabel("time per token, ms (bar: mean; dot: median, whisker to p90)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both", axis="y")
    ax.legend(fontsize=8, ncol=3, loc="upper left")
    ax.set_ylim(top=ax.get_ylim()[1] * 4)  # room for the legend
    ax.set_title("Time per token vs link", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bytes(results: dict, path: Path) -> None:
    link = _target_link(results)
    rows = [r for r in results["runs"] if r["link"] == link and r["system"] != "standalone"]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    keys = [r["key"] for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [max(r["bytes_up_per_token"], 1e-1) for r in rows], width=0.4, label="up (tensor payload)")
    ax.bar([i + 0.2 for i in x], [max(r["wire_bytes_up_per_token"], 1e-1) for r in rows], width=0.4, label="up (on the wire)")
    ax.set_xticks(list(x), keys, rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("bytes up per token")
    ax.grid(alpha=0.3, axis="y", which="both")
    ax.legend(fontsize=8)
    ax.set_title(f"Bytes up per token ({link})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_clients(results: dict, path: Path) -> None:
    c = results["clients"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for i, name in enumerate(dict.fromkeys(r["system"] for r in c["rows"])):
        color = f"C{i}"
        mine = sorted((r for r in c["rows"] if r["system"] == name), key=lambda r: r["clients"])
        n = [r["clients"] for r in mine]
        axes[0].plot(n, [r["p99_ms"] for r in mine], marker="o", color=color, label=f"{name} p99")
        axes[0].plot(n, [r["p50_ms"] for r in mine], marker=".", linestyle=":", color=color, label=f"{name} p50")
        axes[1].plot(n, [r["throughput_tok_s"] for r in mine], marker="o", color=color, label=name)
    axes[0].axhline(c["p99_slo_ms"], color="gray", linestyle="--", linewidth=1, label=f"p99 SLO {c['p99_slo_ms']:.0f} ms")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent edge sessions")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("time per token, ms")
    axes[1].set_ylabel("tokens / s (all sessions)")
    fig.suptitle(f"Many edge clients against one server ({c['link']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
