"""The model's own continuations of a prompt set: what exit heads are trained and evaluated on.

An early exit has to agree with the full model on the text the full model writes, so its training
data is that text (self-distillation), and so is its held-out evaluation (other prompts). Prompts are
encoded with the checkpoint's tokenizer.json (bos first when the model has one); continuations come
from Hugging Face's `generate` over the same local checkpoint (the layer loop equals it token for
token, tests/test_gemma.py), in left-padded batches: greedy, or sampled with a seed for variety.
Each record keeps the token ids, so nothing is re-tokenized later.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class Continuation:
    prompt: str
    prompt_ids: list[int]  # bos + the prompt's tokens
    new_ids: list[int]  # what the model wrote (ends early at eos)
    how: str  # "greedy" or "sample:t=..,top_k=..,top_p=..,seed=.."

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.new_ids


def read_prompts(path: str | Path) -> list[str]:
    """A JSON list of prompt strings."""
    prompts = json.loads(Path(path).read_text())
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError(f"{path}: expected a JSON list of non-empty prompt strings")
    return prompts


def encode_prompts(checkpoint: str | Path, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt as the edge encodes it (tokenizer.json adds bos)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(checkpoint) / "tokenizer.json"))
    return [tok.encode(p).ids for p in prompts]


@torch.inference_mode()
def generate(hf_model, prompt_ids: list[list[int]], max_new_tokens: int, pad_id: int, eos_ids: tuple[int, ...],
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> list[list[int]]:
    """New tokens for each prompt (one left-padded batch); temperature 0 is greedy."""
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)  # [B, T] left-padded
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    kwargs = {"do_sample": False} if temperature <= 0 else {"do_sample": True, "temperature": temperature,
                                                             "top_p": top_p, "top_k": top_k}
    torch.manual_seed(seed)
    out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                            eos_token_id=list(eos_ids), **kwargs)[:, width:]  # [B, <= max_new_tokens]
    result = []
    for row in out.tolist():
        new = []
        for t in row:
            new.append(t)
            if t in eos_ids:
                break
        result.append(new)
    return result


def save(records: list[Continuation], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(r) for r in records], ensure_ascii=False) + "\n")


def load(path: str | Path) -> list[Continuation]:
    return [Continuation(**r) for r in json.loads(Path(path).read_text())]
