"""Exact ties: every greedy choice takes the lowest index among equal best logits, as torch.argmax does and so
Hugging Face's greedy decoding (an argmax over float32 logits). torch.topk orders equal values as it likes: before
the fix the cloud answered the highest id of a tie on a 96-token vocabulary."""
from __future__ import annotations

import pytest
import numpy as np
import torch

from edge_runtime.torch_runner import TorchRunner
from edge_runtime.session import DecodingSession
from plugin.model.checkpoint import load_model
from plugin.model.decoder import top_k_ids, VocabHead
from plugin.model.sampling import Greedy, TopP
from plugin.protocol.codec import encode
from plugin.protocol.messages import CloudRequest
from plugin.split.edge import EdgePartition, ExitOutput
from plugin.split.local import LocalCloud
from plugin.split.plan import PartitionPlan
from tests.tiny_models import LAYERS, save_tiny

SPLIT, TIED = 4, (3, 7)  # the two ids whose logits are made equal and best


def test_top_k_ids_ranks_equal_scores_lowest_index_first():
    scores = torch.tensor([[0.0, 2.0, 5.0, 1.0, 5.0, 2.0, 2.0],  # a tie at the top, a tie across the k-th place
                           [7.0, 1.0, 3.0, 3.0, 3.0, 3.0, 0.0]])
    assert top_k_ids(scores, 4).tolist() == [[2, 4, 1, 5], [0, 2, 3, 4]]
    assert top_k_ids(scores, 4)[:, 0].tolist() == scores.argmax(-1).tolist()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 6, 9])
def test_the_vocab_head_scores_few_rows_as_linear_does(rows):
    """VocabHead's `W @ x.T` (a few rows on a CPU, some padded) is linear's product within float32 rounding, and
    picks the same tokens, in any leading shape; more rows take linear itself."""
    torch.manual_seed(rows)
    head = VocabHead(64, 5000, bias=False)
    x = torch.randn(rows, 3, 64) if rows == 9 else torch.randn(rows, 64)
    got, want = head(x), torch.nn.functional.linear(x, head.weight)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def _tied_head(model):
    """Make `model`'s final head give ids TIED one equal logit, above every other: an exact tie at the top."""
    head = model.exit_logits

    def tied(h, layer):
        logits = head(h, layer)
        if layer == model.cfg.num_layers:
            best = logits.max(dim=-1, keepdim=True).values + 1.0
            logits[..., list(TIED)] = best
        return logits

    model.exit_logits = tied


def test_the_cloud_answers_the_lowest_id_of_a_tie(tmp_path):
    save_tiny("llama", tmp_path)
    model = load_model(tmp_path, range(SPLIT, LAYERS))
    _tied_head(model)
    cloud = LocalCloud(model)
    reply = cloud.send(CloudRequest(1, 0, True, rows=encode(torch.randn(5, model.cfg.hidden_size), "fp32"),
                                    split_layer=SPLIT, start=True, session_key=1))
    assert reply.topk_ids[:2] == list(TIED) and reply.token_id == TIED[0]
    assert reply.topk_logprobs[0] == reply.topk_logprobs[1]
    # through a whole collaborative generation at threshold 1.0: every token is the tie's lowest id
    plan = PartitionPlan(tmp_path, SPLIT, (2, SPLIT), threshold=1.0, codec="fp32")
    edge = EdgePartition(TorchRunner(load_model(tmp_path, range(0, SPLIT))), plan)
    gen = DecodingSession(edge, cloud, "collaborative", sequence_id=2).generate([5, 17, 33], 6)
    assert gen.token_ids == [TIED[0]] * 6


@pytest.mark.parametrize("token_ids, expected", [(None, 1), ([50, 30, 7, 9], 7)], ids=["full head", "shortlist"])
def test_an_edge_exit_picks_the_lowest_id_of_a_tie(token_ids, expected):
    """A shortlist lists its ids by frequency, not in id order: the tie goes to the lowest vocabulary id, as the
    full head over the same logits would choose."""
    ids = None if token_ids is None else np.array(token_ids, np.int64)
    head = ExitOutput(np.array([1.0, 4.0, 4.0, 2.0], np.float32), 0.5, -1, ids)
    assert head.pick(Greedy()) == expected
    assert head.pick(TopP(top_p=1e-6)) == (1 if ids is None else 30)  # sampling answers a vocabulary id too
