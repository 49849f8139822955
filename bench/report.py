"""results.json -> report.md + PNG plots (bench/plots.py).

    python -m bench.report bench/results      # re-render the report from results.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.plots import plot_bytes, plot_clients, plot_latency, plot_quality, PLOTS


def _f(x, fmt: str = ".1f", none: str = "–") -> str:
    return none if x is None else format(x, fmt)


def _pct(x, digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}%"


def _bytes(x) -> str:
    if x is None:
        return "–"
    return f"{x / 1024:.1f} KiB" if x >= 10 * 1024 else f"{x:.0f} B"


# -- markdown -------------------------------------------------------------------------------------
def _runs_table(rows: list[dict]) -> list[str]:
    out = ["| system | time/token mean / median (p90) ms | TTFT median (p90) ms | bytes up/token payload (wire) | "
           "bytes down/token payload (wire) | edge / cloud tokens | cloud layer-token work | server time | "
           "token agreement | ROUGE-L | perplexity |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        out.append(
            f"| {r['key']} | {r['time_per_token_ms']['mean']:.1f} / {r['time_per_token_ms']['median']:.1f} "
            f"({r['time_per_token_ms']['p90']:.1f}) "
            f"| {r['ttft_ms']['median']:.1f} ({r['ttft_ms']['p90']:.1f}) "
            f"| {_bytes(r['bytes_up_per_token'])} ({_bytes(r['wire_bytes_up_per_token'])}) "
            f"| {_bytes(r['bytes_down_per_token'])} ({_bytes(r['wire_bytes_down_per_token'])}) "
            f"| {_pct(r['edge_share'], 0)} / {_pct(r['cloud_share'], 0)} "
            f"| {_pct(r.get('cloud_work_share'))} | {_pct(r.get('server_time_share'))} "
            f"| {_pct(r.get('token_agreement'))} | {_f(r.get('rouge_l'), '.3f')} | {_f(r.get('perplexity'), '.1f')} |")
    return out


def _exits_table(results: dict) -> list[str]:
    rows = [r for r in results["runs"] if r["link"] == results["links"][0]["name"] and r["system"] != "cloud-only"]
    exits = [f"edge:{e}" for e in results["meta"]["exit_layers"]]
    exits += sorted({name for r in rows for name in r["exit_share"]} - set(exits) - {"cloud"})
    out = ["| system | " + " | ".join(exits) + " | cloud | cloud requests/token | uploads/token |",
           "| --- |" + " ---: |" * (len(exits) + 3)]
    for r in rows:
        share = r["exit_share"]
        out.append(f"| {r['key']} | " + " | ".join(_pct(share.get(e), 1) for e in exits)
                   + f" | {_pct(share['cloud'], 1)} | {r['cloud_requests_per_token']:.2f} | {r['uploads_per_token']:.2f} |")
    return out


def _clients_section(c: dict) -> list[str]:
    out = [f"Each session replays a recorded {c['tokens_per_session']}-token generation "
           f"({c['prompts']} held-out prompts; {c['sessions_per_client']} sessions per client, one after another): "
           "the edge's compute between tokens is slept (it runs on the edge device, not on the server; steps it "
           "computed ahead during a request overlap that request), its requests go through "
           f"the link emulator ({c['link']}) to the one server, uploads in the background as the edge's uploader does.",
           "", "| system | clients | tokens/s | p50 ms | p99 ms | TTFT p50 ms | server busy s (share of wall) | server executions / requests |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in c["rows"]:
        out.append(f"| {r['system']} | {r['clients']} | {r['throughput_tok_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
                   f"| {r['ttft_p50_ms']:.1f} | {r['server_busy_s']:.2f} ({_pct(r['server_busy_share'], 0)}) "
                   f"| {r['server_executions']} / {r['server_requests']} |")
    out += ["", f"Clients one server carries at the same p99 time per token (the most clients measured before p99 "
            f"first exceeds the bound; ~ interpolates between the measured points). Bound used in the plot: "
            f"{c['p99_slo_ms']:.1f} ms ({c['slo_rule']}).", ""]
    names = list(c["capacity"])
    out += ["| p99 bound | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for entry in c.get("capacity_by_slo") or [{"multiple": None, "p99_slo_ms": c["p99_slo_ms"], "capacity": c["capacity"]}]:
        label = f"{entry['p99_slo_ms']:.0f} ms" + (f" ({entry['multiple']:g} x single-client)" if entry["multiple"] else "")
        cells = []
        for name in names:
            cap = entry["capacity"][name]
            cell = str(cap["max_clients_within_slo"]) + ("+" if cap["all_measured_within_slo"] else "")
            if cap.get("interpolated_clients"):
                cell += f" (~{cap['interpolated_clients']:g})"
            cells.append(cell)
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out


def _perf_section(perf: dict) -> list[str]:
    inputs = perf.get("inputs", {})
    out = [f"`{perf.get('command', 'python -m bench.perf_sweep')}`: recorded edge sessions as `--input-data` "
           "(one stream per sequence), one perf_analyzer run per concurrency (concurrent sequences), sync gRPC.", ""]
    for model, info in inputs.items():
        out.append(f"- {model}: {info['streams']} streams of {info['steps_per_stream']} requests "
                   f"({info['token_requests']} token requests, {info['uploads']} uploads in all)")
    out += ["", "A `ce_collm` inference is an upload or a token request (a cloud-resolved token, catch-up rows "
            "included; edge-resolved tokens never reach the server); a `cloud_only` inference is one token.", "",
            "| model | concurrency | inferences/s | cloud tokens/s | p50 ms | p99 ms | server compute ms/inference | teardown errors |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in perf.get("rows", []):
        if "throughput" not in r:
            out.append(f"| {r['model']} | {r['concurrency']} | failed: {r.get('error', '?')} | | | | | |")
            continue
        compute = r.get("server_compute_us")
        out.append(f"| {r['model']} | {r['concurrency']} | {r['throughput']:.1f} | {r['tokens_per_s']:.1f} "
                   f"| {r['p50_us'] / 1000:.1f} | {r['p99_us'] / 1000:.1f} | {_f(None if compute is None else compute / 1000, '.2f')} "
                   f"| {_f(r.get('teardown_errors'), 'd')} |")
    return out


def _verified_section(results: dict) -> list[str]:
    """Verified mode against cloud-only on each link: the issue's targets, then what each round trip carried."""
    rows = [r for r in results["runs"] if r["system"] == "verified"]
    if not rows:
        return []
    by = {(r["key"], r["link"]): r for r in results["runs"]}
    out = ["## Verified mode", "",
           "The edge's exits draft up to gamma tokens (a draft stops at the first confident exit, else the last), the "
           "cloud runs every row it has not seen through its layers in one pass and returns the full model's top-K "
           "after each drafted row; the edge keeps the drafts the full model agrees with plus its own next token, and "
           "the next request rolls back the rest. While a request is out the edge drafts on as if all were kept.", ""]
    targets = results.get("verified_targets") or []
    if targets:
        out += ["| target | wanted | measured | |", "| --- | --- | --- | --- |"]
        out += [f"| {t['name']} | {t['target']} | {t['display']} | {'met' if t['met'] else '**missed**'} |"
                for t in targets]
        out.append("")
    out += ["| system | link | time/token mean ms (vs cloud-only) | acceptance | tokens per round trip | gamma | "
            "cloud rows per token | edge steps ahead kept | per request: edge before it leaves / drafting ahead / "
            "waiting, ms | exits agreeing with the full model |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        v, ref = r["verified"], by.get(("cloud-only", r["link"]))
        mean = r["time_per_token_ms"]["mean"]
        ratio = f" ({mean / ref['time_per_token_ms']['mean']:.2f}x)" if ref else ""
        agreement = ", ".join(f"{k} {100 * a['rate']:.0f}% of {a['checked']}" for k, a in v["exit_agreement"].items())
        requests = r["cloud_requests_per_token"] * r["tokens"]
        split = " / ".join(_f(None if r.get(k) is None else 1000 * r[k] / requests)
                           for k in ("edge_compute_s", "speculation_s", "cloud_wait_s"))
        out.append(f"| {r['key']} | {r['link']} | {mean:.1f}{ratio} | {_pct(v['acceptance_rate'], 0)} "
                   f"| {v['tokens_per_round_trip']:.2f} | {v['gamma']:.1f} | {r['cloud_rows_per_token']:.2f} "
                   f"| {_kept(r)} | {split} | {agreement} |")
    return out + [""]


def _kept(row: dict) -> str:
    done = row.get("speculated", 0)
    return f"{row.get('speculation_hits', 0) / done:.0%}" if done else "none"


def _reading(results: dict) -> list[str]:
    """What the target numbers are made of, from the measurements themselves."""
    targets = results.get("targets") or []
    if not targets:
        return []
    m, link = results["meta"], targets[0]["link"]
    by = {(r["key"], r["link"]): r for r in results["runs"]}
    collab, cloud = by.get((targets[0]["system"], link)), by.get(("cloud-only", link))
    if collab is None or cloud is None or "time_per_token_by_resolver_ms" not in collab:
        return []
    split = collab["time_per_token_by_resolver_ms"]
    edge_t, cloud_t, ref_t = split.get("edge"), split.get("cloud"), cloud["time_per_token_ms"]["mean"]
    share = collab["edge_share"]
    out = ["## Reading the targets", ""]
    if edge_t is not None and cloud_t is not None:
        ideal = 1 - (share * edge_t + (1 - share) * ref_t) / ref_t
        out.append(
            f"- Time per token: {targets[0]['system']} resolved {100 * share:.0f}% of its tokens on the edge at "
            f"{edge_t:.1f} ms each; its cloud tokens took {cloud_t:.1f} ms against cloud-only's {ref_t:.1f} ms "
            f"(the ensemble chains two python models, and the edge's {m['split_layer']} layers and exit heads run "
            f"before a cloud request unless they were computed ahead: while each request was out the edge computed "
            f"the next position on its best guess, and kept {_kept(collab)} of those guesses). Even if a cloud "
            f"token cost no more than a cloud-only one, "
            f"{100 * share:.0f}% edge tokens would give at most {100 * ideal:.0f}% less time per token here. The "
            "saving grows with the round trip (see the other links) and with the share of confident exits, which "
            "a small model trained for under an hour on a CPU keeps low.")
    work_bound = (m["num_layers"] - m["split_layer"]) / m["num_layers"]
    out.append(f"- Cloud layer-token work: the cloud runs {m['num_layers'] - m['split_layer']} of {m['num_layers']} "
               f"layers and catches up every row once, so {100 * work_bound:.0f}% is the bound for any threshold; "
               "it ends a little lower only by the rows still pending on the edge when a generation stops.")
    lc = results.get("long_context")
    if lc:
        out.append(f"- Bytes up: the naive split sends the whole context with every token (about prompt + position "
                   f"rows), collaborative one row per token (plus the prompt once), so the ratio grows with the "
                   f"generation: {targets[-1]['measured']:.1f}x over {m['max_new_tokens']} tokens, "
                   f"{lc['ratio']:.1f}x over {lc['tokens']}.")
    agree = collab.get("token_agreement")
    if agree == 1.0:
        out.append("- Token agreement: every token the edge resolved was the full model's choice on these prompts "
                   "(a wrong exit would also change every later token's context); the standalone edge, which never "
                   "asks the cloud, shows what the exits alone give.")
    elif agree is not None:
        out.append(f"- Token agreement {100 * agree:.1f}%: position by position, so one wrong exit also costs the "
                   "tokens after it (their context differs); exact matches and ROUGE-L are in the tables.")
    out.append(f"- Noise: the {m['cpus']} cores are shared by the server, the edge, the link emulator and whatever "
               "else runs on the machine; systems run interleaved per prompt so that load lands on all alike.")
    return out + [""]


def render_markdown(results: dict, plots: dict[str, str]) -> str:
    m = results["meta"]
    lines = [
        "# CE-CoLLM benchmark", "",
        f"Generated by `{m.get('command') or 'ce-collm bench'}` on {m['date']} in {m['wall_s'] / 60:.1f} min. "
        f"Model `{m['checkpoint']}` ({m['arch']}, {m['num_layers']} layers, hidden {m['hidden_size']}, vocab "
        f"{m['vocab_size']}), split at layer {m['split_layer']}, edge exits after layers {m['exit_layers']}. "
        f"{m['prompts']} held-out prompts ({min(m['prompt_tokens'])}-{max(m['prompt_tokens'])} tokens) x "
        f"{m['max_new_tokens']} greedy tokens each, every system on the same tritonserver {m.get('triton_version') or ''} "
        f"(python backend, {m['serve_options']['instance_kind']}, {m['serve_options']['instances']} instance per model, "
        f"max batch {m['serve_options']['max_batch_size']}). Machine: {m['cpus']} CPU cores ({m['machine']}), no GPU; "
        f"server (torch with {m.get('server_threads') or 'default'} thread per model process), edge ({m.get('edge_runner', 'torch')} with "
        f"{m['edge_threads']} thread) and link emulator "
        + (f"run on them. Pinned: {m['pinning']}." if m.get("pinning") else "share them."), "",
    ]
    targets = results.get("targets") or []
    if targets:
        lines += [f"## Targets ({targets[0]['system']} vs cloud-only, {targets[0]['link']})", "",
                  "| target | wanted | measured | |", "| --- | --- | --- | --- |"]
        for t in targets:
            lines.append(f"| {t['name']} | {t['target']} | {t['display']} | {'met' if t['met'] else '**missed**'} |")
        lines.append("")
    lines += _reading(results)
    lines += _verified_section(results)
    lines += ["## Systems per link", "",
              "Time per token: between consecutive tokens (the first token's time is TTFT). Bytes: tensor payload "
              "counted by the edge, and everything the link emulator carried (gRPC/HTTP-2 framing included). "
              "Cloud layer-token work: rows x layers the server computed, as a share of cloud-only's; server time: "
              "Triton's compute time (statistics API, per executed batch) as a share of cloud-only's. Quality is "
              "against cloud-only's output for the same prompts; perplexity is the full model's perplexity of the "
              "chosen tokens (lower: the full model finds the continuation likelier).", ""]
    for link in [l["name"] for l in results["links"]]:
        lines += [f"### {link}", ""] + _runs_table([r for r in results["runs"] if r["link"] == link]) + [""]
    if "latency" in plots:
        lines += [f"![time per token vs link]({plots['latency']})", ""]
    lines += ["## Where tokens are resolved", "", "Shares of tokens per edge exit and the cloud (identical on every link: "
              "the exit decision does not depend on the network).", ""] + _exits_table(results) + [""]
    lc = results.get("long_context")
    if lc:
        lines += [f"Over longer generations ({lc['prompts']} prompts x {lc['tokens']} tokens, loopback link) the naive "
                  "split's requests keep growing with the context while collaborative's stay one row per token:", "",
                  "| system | bytes up/token payload | on the wire |", "| --- | ---: | ---: |"]
        lines += [f"| {r['key']} | {_bytes(r['bytes_up_per_token'])} | {_bytes(r['wire_bytes_up_per_token'])} |"
                  for r in lc["rows"]]
        lines += ["", f"Ratio: {lc['ratio']:.1f}x (payload), {lc['wire_ratio']:.1f}x (wire).", ""]
    if "quality" in plots:
        lines += [f"![quality vs cloud share]({plots['quality']})", ""]
    if "bytes" in plots:
        lines += [f"![bytes up per token]({plots['bytes']})", ""]
    if results.get("clients"):
        lines += ["## Many edge clients", ""] + _clients_section(results["clients"]) + [""]
        if "clients" in plots:
            lines += [f"![many clients]({plots['clients']})", ""]
    if results.get("perf_analyzer"):
        lines += ["## perf_analyzer", ""] + _perf_section(results["perf_analyzer"]) + [""]
    samples = [s for s in results.get("samples") or [] if s.get("text") is not None]
    if samples:
        lines += ["## The first prompt's continuation", ""]
        for s in samples:
            text = s["text"].replace("\n", " / ").replace("|", "\\|")
            lines.append(f"- **{s['key']}**: {text}")
        lines.append("")
    return "\n".join(lines)


def write_report(results: dict, out: Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    perf = out / "perf_analyzer.json"
    if perf.is_file() and "perf_analyzer" not in results:
        results = dict(results, perf_analyzer=json.loads(perf.read_text()))
    plots = {}
    makers = {"quality": plot_quality, "latency": plot_latency, "bytes": plot_bytes}
    if results.get("clients"):
        makers["clients"] = plot_clients
    for name, make in makers.items():
        make(results, out / PLOTS[name])
        plots[name] = PLOTS[name]
    path = out / "report.md"
    path.write_text(render_markdown(results, plots) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else Path(__file__).resolve().parent / "results"
    results = json.loads((out / "results.json").read_text())
    print(write_report(results, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
