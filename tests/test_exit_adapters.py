"""Exit adapters for any checkpoint, and the calibration report of its exits (tiny random Llama)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from plugin.model.checkpoint import load_model
from plugin.split.plan import PartitionPlan
from plugin.training.calibration import agreeing, exit_assignment, pick_threshold, report, TokenStats, wrong_at_most
from plugin.training.exit_heads import (
    evaluate_heads, ExitHeads, freeze, random_windows, spaced_windows, TextTokenizer, train_step)
from tests.tiny_models import LAYERS, VOCAB, save_tiny

REPO = Path(__file__).resolve().parents[1]
EXITS = (2, 4)
LINES = [
    "the king is dead and the queen is sad",
    "a horse a horse my kingdom for a horse",
    "to be or not to be that is the question",
    "the night is long that never finds the day",
    "what is done cannot be undone",
    "all the world is a stage and all the men and women merely players",
    "good night sweet prince and flights of angels sing thee to thy rest",
    "fair is foul and foul is fair",
]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "build" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _save_tokenizer(path: Path) -> None:
    """A tiny BPE (ids < VOCAB) trained on the lines above, with <s>/</s> as bos/eos."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(LINES, trainer=trainer)
    assert tok.get_vocab_size() <= VOCAB
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(plan path, text file): a tiny random Llama with its tokenizer and a plan beside it."""
    ckpt = tmp_path_factory.mktemp("tiny-llama")
    save_tiny("llama", ckpt)
    _save_tokenizer(ckpt)
    plan = ckpt / "partition_plan.json"
    plan.write_text(json.dumps({"checkpoint": ".", "split_layer": 4, "exit_layers": list(EXITS),
                                "threshold": 0.8, "codec": "fp16"}))
    text = ckpt / "train.txt"
    g = torch.Generator().manual_seed(0)
    order = torch.randint(0, len(LINES), (300,), generator=g).tolist()
    text.write_text("\n".join(LINES[i] for i in order) + "\n")
    return plan, text


def _data(plan_path: Path, text: Path):
    tokenizer = TextTokenizer.from_checkpoint(PartitionPlan.load(plan_path).checkpoint)
    assert tokenizer.bos_id == 1 and tokenizer.eos_id == 2
    return tokenizer, tokenizer.encode_documents([text.read_text()])


def test_training_reduces_kl_to_the_final_layer(tiny):
    plan_path, text = tiny
    plan = PartitionPlan.load(plan_path)
    model = freeze(load_model(plan.checkpoint))
    tokenizer, stream = _data(plan_path, text)
    fixed = spaced_windows(stream, 8 * 32, 32, tokenizer.bos_id)  # [8, 32]
    torch.manual_seed(0)
    heads = ExitHeads(model, EXITS, rank=8)
    before = evaluate_heads(model, heads, fixed, batch_size=8)
    backbone = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(heads.trainable_parameters(), lr=1e-2)
    for step in range(40):
        ids = random_windows(stream, 4, 32, tokenizer.bos_id, seed=0, step=step)
        train_step(model, heads, optimizer, ids, kl_weight=1.0, ce_weight=0.0)
    after = evaluate_heads(model, heads, fixed, batch_size=8)
    for e in EXITS:
        assert before[e]["kl"] > 0.05, "the tiny model's exits should disagree with its final layer"
        assert after[e]["kl"] < 0.7 * before[e]["kl"], (e, before[e], after[e])
    assert all(not p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, backbone[k]), f"backbone weight {k} changed"


def test_cli_saves_adapters_the_loader_reads_and_updates_the_plan(tiny, tmp_path):
    plan_src, text = tiny
    plan_path = plan_src.parent / "plan_with_adapters.json"  # a copy: the module's plan stays bare
    plan_path.write_text(plan_src.read_text())
    out = plan_path.parent / "exit_adapters.safetensors"
    rc = _script("train_exit_adapters").main(
        ["--plan", str(plan_path), "--text", str(text), "--rank", "8", "--steps", "6", "--seq-len", "32",
         "--batch-size", "4", "--lr", "1e-2", "--val-tokens", "128", "--update-plan"])
    assert rc == 0 and out.is_file()

    plan = PartitionPlan.load(plan_path)
    assert plan.exit_adapters == out.resolve()
    assert json.loads(plan_path.read_text())["exit_adapters"] == "exit_adapters.safetensors"  # relative
    bare = load_model(plan.checkpoint)
    adapted = load_model(plan.checkpoint, exit_adapters=plan.exit_adapters)
    assert sorted(adapted.exit_adapters) == [str(e) for e in EXITS]
    assert adapted.exit_adapters[str(EXITS[0])].down.out_features == 8
    h = torch.randn(5, bare.cfg.hidden_size)
    for e in EXITS:
        assert not torch.allclose(bare.exit_logits(h, e), adapted.exit_logits(h, e))
    torch.testing.assert_close(bare.exit_logits(h, LAYERS), adapted.exit_logits(h, LAYERS), rtol=0, atol=0)

    # What training optimised is what the loader computes.
    from safetensors.torch import load_file

    heads = ExitHeads(bare, EXITS, rank=8)
    heads.load_adapters(load_file(out))
    with torch.no_grad():
        for e in EXITS:
            torch.testing.assert_close(heads.logits(h, e), adapted.exit_logits(h, e))


def test_calibration_writes_consistent_report(tiny, tmp_path):
    plan_path, text = tiny
    out = tmp_path / "calibration"
    script = _script("calibrate_exits")
    assert script.parse_args(["--plan", "p.json"]).thresholds == (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
    # A random tiny model is never confident: low thresholds make every exit and the cloud get tokens.
    rc = script.main(["--plan", str(plan_path), "--text", str(text), "--tokens", "512", "--seq-len", "64",
                      "--thresholds", "0,0.04,0.05,0.8,1.0", "--out", str(out)])
    assert rc == 0
    rep = json.loads((out / "calibration.json").read_text())
    assert (out / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "calibration.md").read_text()
    assert "| threshold |" in md and "Exit after layer 2" in md
    assert rep["exit_layers"] == list(EXITS) and rep["tokens"] == 8 * 63
    assert [t["threshold"] for t in rep["thresholds"]] == [0, 0.04, 0.05, 0.8, 1.0]
    assert rep["thresholds"][0]["exit_share"][str(EXITS[0])] == 1.0  # threshold 0: all at the first exit
    assert any(t["cloud_share"] > 0 and all(s > 0 for s in t["exit_share"].values()) for t in rep["thresholds"])
    for t in rep["thresholds"]:
        assert sum(t["exit_share"].values()) + t["cloud_share"] == pytest.approx(1.0, abs=1e-12)
        assert t["edge_share"] == pytest.approx(sum(t["exit_share"].values()), abs=1e-12)
    last = rep["thresholds"][-1]
    assert last["threshold"] == 1.0 and last["edge_share"] == 0 and last["cloud_share"] == 1
    assert last["token_agreement"] == 1.0
    shares = [t["edge_share"] for t in rep["thresholds"]]
    assert shares == sorted(shares, reverse=True)  # a higher threshold never exits more tokens
    for name, r in rep["outputs"].items():
        assert sum(b["count"] for b in r["bins"]) == rep["tokens"]
        assert r["ppl"] > 1
    assert rep["outputs"][f"final_{LAYERS}"]["agreement"] == 1.0


def test_exit_rule_is_first_confident_exit():
    conf = torch.tensor([[0.9, 0.2, 0.5, 1.0, 0.1],
                         [0.1, 0.85, 0.95, 1.0, 0.3]], dtype=torch.float64)
    assert exit_assignment(conf, 0.8).tolist() == [0, 1, 1, 0, 2]
    assert exit_assignment(conf, 1.0).tolist() == [2] * 5  # 1.0 never exits, even at confidence 1.0
    stats = TokenStats(layers=(1, 2, 3), confidence=torch.cat([conf, torch.ones(1, 5, dtype=torch.float64)]),
                       token=torch.tensor([[7, 1, 3, 4, 0], [7, 2, 3, 5, 0], [7, 2, 9, 4, 4]]),
                       nll=torch.ones(3, 5, dtype=torch.float64), target=torch.tensor([7, 2, 9, 4, 1]))
    row = next(t for t in report(stats, bins=4)["thresholds"] if t["threshold"] == 0.8)
    assert row["exit_share"] == {"1": 0.4, "2": 0.4} and row["cloud_share"] == pytest.approx(0.2)
    assert row["exit_agreement"] == {"1": 1.0, "2": 0.5}  # token 0 and 3 agree; of 1 and 2, only 1
    assert row["token_agreement"] == pytest.approx(0.8)
    assert row["wrong_exit_share"] == pytest.approx(0.2)  # token 2 exits with 3, the final layer says 9
    # picked on these positions: the lowest threshold whose exiting tokens agree often enough (1.0: none does)
    assert pick_threshold(stats, agreeing(0.7)) == 0.31  # 0.30 also lets token 4 leave at exit 2, wrongly: 3 of 5
    assert pick_threshold(stats, agreeing(0.99)) == 0.96  # below it token 2 leaves at exit 2 (3 against the final 9)
    assert pick_threshold(stats, agreeing(1.01)) == 1.0
    # or whose wrong exits are few enough among all tokens
    assert pick_threshold(stats, wrong_at_most(0.4)) == 0.3  # 2 of 5 wrong at 0.30
    assert pick_threshold(stats, wrong_at_most(0.2)) == 0.31
    assert pick_threshold(stats, wrong_at_most(0.0)) == 0.96


def test_scripts_have_help(capsys):
    for name in ("train_exit_adapters", "calibrate_exits"):
        with pytest.raises(SystemExit) as done:
            _script(name).main(["--help"])
        assert done.value.code == 0
        assert "--plan" in capsys.readouterr().out


def test_cached_shortlist_heads_train_save_and_load(tiny, tmp_path):
    """--cache: the backbone runs once; shortlist heads (S tokens + "other") learn, save, and load into
    the layer loop with the same logits; an exit never emits a token outside its shortlist."""
    from safetensors import safe_open

    from plugin.model.decoder import exit_decision
    from plugin.training.continuations import Continuation, save

    plan_src, text = tiny
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps({**json.loads(plan_src.read_text()), "checkpoint": str(plan_src.parent)}))
    g = torch.Generator().manual_seed(1)
    conts = tmp_path / "continuations.json"
    save([Continuation("p", [1] + torch.randint(3, VOCAB, (5,), generator=g).tolist(),
                       torch.randint(3, VOCAB, (20,), generator=g).tolist(), "greedy") for _ in range(6)], conts)
    out, shortlist = tmp_path / "heads.safetensors", 24
    args = ["--plan", str(plan_path), "--continuations", str(conts), "--text", str(text), "--text-tokens", "512",
            "--seq-len", "32", "--cache", str(tmp_path / "cache"), "--cache-layers", "1,2,3,4", "--shortlist",
            str(shortlist), "--rank", "8", "--steps", "30", "--tokens-per-step", "64", "--lr", "1e-2",
            "--val-tokens", "64"]
    script = _script("train_exit_adapters")
    assert script.main(args + ["--out", str(out)]) == 0
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["layers"] == [1, 2, 3, 4] and meta["tokens"] == 6 * 25 + 16 * 31  # all but each bos row
    with safe_open(out, "pt") as f:
        info = f.metadata()
        assert f.get_tensor("shortlist.token_ids").shape == (shortlist,)
    assert info["adapter_input"] == "rms"
    before, after = json.loads(info["validation_before"]), json.loads(info["validation_after"])
    for e in EXITS:
        assert after[str(e)]["kl"] < 0.8 * before[str(e)]["kl"], (e, before[str(e)], after[str(e)])
    stamp = (tmp_path / "cache" / "z.npy").stat().st_mtime_ns
    assert script.main(args + ["--out", str(tmp_path / "again.safetensors"), "--steps", "1"]) == 0
    assert (tmp_path / "cache" / "z.npy").stat().st_mtime_ns == stamp  # the same data: the cache is reused

    plan = PartitionPlan.load(plan_path)
    model = load_model(plan.checkpoint, exit_adapters=out)
    ids = model.shortlist.token_ids
    h = torch.randn(200, model.cfg.hidden_size) * 30
    heads = ExitHeads(load_model(plan.checkpoint), EXITS, rank=8, shortlist=ids, normalize_input=True)
    from safetensors.torch import load_file

    heads.load_adapters(load_file(out))
    with torch.no_grad():
        for e in EXITS:
            logits = model.exit_logits(h, e)
            assert logits.shape == (200, shortlist + 1)
            torch.testing.assert_close(heads.logits(h, e), logits)
            conf, token = exit_decision(logits, model.exit_token_ids(e))
            assert set(token.tolist()) <= set(ids.tolist())
            torch.testing.assert_close(conf, torch.softmax(logits, -1)[:, :-1].max(-1).values)
    assert model.exit_logits(h, LAYERS).shape == (200, VOCAB)  # the final layer keeps the full head
