"""What the edge makes of what a user hands it: a prompt longer than the server takes in one request
(sent in blocks, against a real tritonserver), a prompt that is not UTF-8 and numbers out of range
(`ce-collm-edge generate` refuses them in one line before any work)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from edge_runtime.cli import build_parser, main
from edge_runtime.cloud_only import CloudOnlySession
from edge_runtime.triton_link import TritonLink
from plugin.model.checkpoint import load_model
from plugin.protocol.errors import ErrorCode, ProtocolError
from plugin.serving.repository import ServeOptions, write_repository
from plugin.split.limits import Limits
from plugin.split.local import LocalCloud
from plugin.split.plan import PartitionPlan
from tests.tiny_models import save_tiny

BLOCK = 4  # the served model's max_block_rows: the prompt below takes three requests
PROMPT = [5, 17, 33, 2, 71, 90, 4, 4, 12, 61, 8]


@pytest.fixture(scope="module")
def small_blocks(tmp_path_factory, start_server):
    """A server whose models take at most BLOCK rows per request, and the full model in this process."""
    ckpt = tmp_path_factory.mktemp("ckpt")
    save_tiny("llama", ckpt)
    repo = tmp_path_factory.mktemp("repo")
    write_repository(PartitionPlan(ckpt, 4, (1, 4)), repo, ServeOptions(limits=Limits(max_block_rows=BLOCK)))
    return start_server(repo), load_model(ckpt)


@pytest.mark.server
def test_cloud_only_sends_a_long_prompt_in_blocks(small_blocks):
    """Tokens equal those of one request holding the whole prompt (the cloud computes every block's KV)."""
    server, full = small_blocks
    link = TritonLink(server.grpc_url, "cloud_only")
    with pytest.raises(ProtocolError, match="exceeds the limit of 4 rows") as refused:
        CloudOnlySession(link, sequence_id=11, max_block_rows=len(PROMPT)).generate(PROMPT, 1)
    assert refused.value.code is ErrorCode.LIMIT_EXCEEDED
    blocks = CloudOnlySession(link, sequence_id=12, max_block_rows=BLOCK).generate(PROMPT, 8)
    whole = CloudOnlySession(LocalCloud(full), sequence_id=12).generate(PROMPT, 8)
    assert blocks.token_ids == whole.token_ids and len(blocks.token_ids) == 8
    assert blocks.stats.cloud_requests == 3 + 7 and whole.stats.cloud_requests == 8  # 11 = 4 + 4 + 3 prompt rows
    assert blocks.records[0].cloud_rows == len(PROMPT)


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The last stderr line of `ce-collm-edge generate ARGV`, which must exit 2 in argparse's one error line."""
    with pytest.raises(SystemExit) as done:
        main(["generate", "--mode", "standalone", "--prompt", "ROMEO:", *argv])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("ce-collm-edge generate: error: argument "), last
    return last


def test_a_prompt_that_is_not_utf8_is_refused_in_one_line():
    """The shell passes the bytes as they are; Python keeps the undecodable ones as lone surrogates."""
    cmd = [sys.executable.encode(), b"-m", b"edge_runtime.cli", b"generate", b"--mode", b"standalone",
           b"--prompt", b"ROMEO: \xff\xfe soft"]
    done = subprocess.run(cmd, capture_output=True, timeout=120)
    err = done.stderr.decode(errors="replace")
    assert done.returncode == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("ce-collm-edge generate: error: argument --prompt: not UTF-8 text"), last
    assert done.stdout == b""


@pytest.mark.parametrize("flag, value, words", [
    ("--max-new-tokens", "-5", "an integer >= 1"),
    ("--max-new-tokens", "0", "an integer >= 1"),
    ("--max-new-tokens", "many", "an integer >= 1, got 'many'"),
    ("--threshold", "high", "not a number: 'high'"),
    ("--threshold", "nan", "threshold must lie in [0, 1], got nan"),
    ("--threshold", "5", "threshold must lie in [0, 1], got 5.0"),
    ("--threshold", "-0.1", "threshold must lie in [0, 1]"),
    ("--temperature", "-1", "a finite number >= 0"),
    ("--temperature", "inf", "a finite number >= 0"),
    ("--top-p", "0", "a number in (0, 1]"),
    ("--top-p", "nan", "a number in (0, 1]"),
    ("--seed", "-1", "expected an integer in [0, 18446744073709551615], got '-1'"),
    ("--latency-budget-ms", "nan", "a finite number >= 0"),
    ("--latency-budget-ms", "-250", "a finite number >= 0"),
    ("--sequence-id", "-3", "an integer in [1, "),
    ("--sequence-id", str(1 << 64), "an integer in [1, 18446744073709551615]"),
    ("--max-gamma", "-1", "an integer >= 0"),
    ("--gamma", "-2", "an integer >= 0"),
    ("--patience", "-inf", "a finite number >= 0"),
])
def test_numbers_out_of_range_are_refused_in_one_line(flag, value, words, capsys):
    last = _refused([f"{flag}={value}"], capsys)  # "=": argparse takes a lone "-inf" for an option
    assert last.startswith(f"ce-collm-edge generate: error: argument {flag}: ") and words in last, last


def test_numbers_in_range_are_taken():
    """The edges of each range are valid: a threshold of 1.0 never exits, a patience of 0 never waits."""
    args = build_parser().parse_args(
        ["generate", "--prompt", "ROMEO: \u00e9", "--max-new-tokens", "1", "--threshold", "1", "--temperature", "0",
         "--top-p", "1", "--seed", "0", "--latency-budget-ms", "0", "--sequence-id", str((1 << 64) - 1),
         "--max-gamma", "0", "--gamma", "0", "--patience", "0"])
    assert (args.prompt, args.max_new_tokens, args.threshold, args.temperature, args.top_p, args.seed) == \
        ("ROMEO: \u00e9", 1, 1.0, 0.0, 1.0, 0)
    assert (args.latency_budget_ms, args.sequence_id, args.max_gamma, args.gamma, args.patience) == \
        (0.0, (1 << 64) - 1, 0, 0, 0.0)
