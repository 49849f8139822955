"""The protocol contract: the tensor table against the configs and docs/protocol.md, error codes, no prose matching.

No server here: the configs are parsed into Triton's ModelConfig protobuf and compared with the table
itself (not with the renderer's output), and the error codes are decoded from messages shaped as
Triton delivers them. tests/test_triton_cloud.py sends each error kind through a real tritonserver.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as pb

from plugin.model.checkpoint import read_config
from plugin.paths import DEMO_PLAN, MODEL_REPOSITORY, REPO_ROOT
from plugin.protocol import docs
from plugin.protocol.errors import (
    error_code, error_for, ErrorCode, EXTERNAL_SIGNATURES, ProtocolError, Recovery, SequenceNeedsStart, tagged)
from plugin.protocol.tensors import (
    CLOUD_ONLY, CLOUD_PARTITION, CONTEXT_MANAGER, ENSEMBLE, inputs_of, outputs_of, TENSORS, TensorSpec)
from plugin.serving.repository import render_configs, ServeOptions
from plugin.serving.trt_repository import parse_config
from plugin.split.plan import PartitionPlan
from tests.tiny_models import save_tiny

MODELS = (ENSEMBLE, CONTEXT_MANAGER, CLOUD_PARTITION, CLOUD_ONLY)


def _declared(tensors, specs: list[TensorSpec], hidden: int, as_input: bool) -> list[list[tuple]]:
    """[what the config declares, what the table says]; optional and ragged are input fields only."""
    got = [(t.name, pb.DataType.Name(t.data_type), list(t.dims))
           + ((t.optional, t.allow_ragged_batch) if as_input else ()) for t in tensors]
    want = [(s.name, f"TYPE_{s.triton_dtype}", s.config_dims(hidden))
            + ((s.optional, s.ragged) if as_input else ()) for s in specs]
    return [got, want]


def _check_against_table(configs: dict[str, pb.ModelConfig], hidden: int) -> None:
    for name in MODELS:
        got, want = _declared(configs[name].input, inputs_of(name), hidden, as_input=True)
        assert got == want, f"{name} inputs"
        got, want = _declared(configs[name].output, outputs_of(name), hidden, as_input=False)
        assert got == want, f"{name} outputs"
    steps = {s.model_name: s for s in configs[ENSEMBLE].ensemble_scheduling.step}
    assert set(steps) == {CONTEXT_MANAGER, CLOUD_PARTITION}
    # the context manager's outputs reach the cloud partition's inputs of the same names, through the ensemble
    produced_by = {tensor: output for output, tensor in steps[CONTEXT_MANAGER].output_map.items()}
    assert {key: produced_by[tensor] for key, tensor in steps[CLOUD_PARTITION].input_map.items()} \
        == {t.name: t.name for t in inputs_of(CLOUD_PARTITION)}
    assert set(steps[CONTEXT_MANAGER].input_map) == {t.name for t in inputs_of(CONTEXT_MANAGER)}
    assert dict(steps[CLOUD_PARTITION].output_map) == {t.name: t.name for t in outputs_of(ENSEMBLE)}


def test_committed_configs_declare_the_table():
    plan = PartitionPlan.load(DEMO_PLAN)
    configs = {name: parse_config(MODEL_REPOSITORY / name / "config.pbtxt") for name in MODELS}
    _check_against_table(configs, read_config(plan.checkpoint).hidden_size)


def test_generated_configs_declare_the_table(tmp_path):
    save_tiny("llama", tmp_path / "ckpt")
    texts = render_configs(PartitionPlan(tmp_path / "ckpt", 4, (1, 4)), tmp_path / "repo", ServeOptions())
    configs = {}
    for name, text in texts.items():
        (tmp_path / f"{name}.pbtxt").write_text(text)
        configs[name] = parse_config(tmp_path / f"{name}.pbtxt")
    _check_against_table(configs, 64)
    for name in (CONTEXT_MANAGER, CLOUD_PARTITION):  # both admit a session by one rule: they need the same input
        assert {p: v.string_value for p, v in configs[name].parameters.items()}["min_split_layer"] == "4"


def test_protocol_doc_tables_are_the_table():
    text = docs.PROTOCOL_DOC.read_text()
    assert docs.render(text) == text, "run: python -m plugin.protocol.docs"
    for name in TENSORS:
        assert f"| `{name}` |" in text
    for code in ErrorCode:
        assert f"| `{code.name}` |" in text


def test_every_code_is_found_where_triton_puts_it():
    for code in ErrorCode:
        message = tagged(code, "a sentence that may be reworded [at will]")
        assert error_code(message) is code
        assert error_code(f"in ensemble 'ce_collm', {message}", "StatusCode.INTERNAL") is code  # the ensemble's prefix
        err = error_for(code, message)
        assert err.code is code and isinstance(err, SequenceNeedsStart) == (code.recovery is Recovery.RESYNC)


def test_external_errors_are_known_by_their_words_then_by_status():
    for signature in EXTERNAL_SIGNATURES:
        assert error_code(f"some prefix: {signature.words} and more", "StatusCode.UNAVAILABLE") is signature.code
    assert error_code("failed to connect to all addresses", "StatusCode.UNAVAILABLE") is ErrorCode.UNREACHABLE
    assert error_code("Deadline Exceeded", "StatusCode.DEADLINE_EXCEEDED") is ErrorCode.UNREACHABLE
    assert error_code("unexpected inference input 'EVIL'", "StatusCode.INVALID_ARGUMENT") is ErrorCode.SERVER
    assert error_code("[ce-collm:NO_SUCH_CODE] from a newer server", "StatusCode.INTERNAL") is ErrorCode.SERVER
    assert isinstance(error_for(ErrorCode.POSITION_GAP, "x"), ProtocolError)


SOURCES = [p for d in ("plugin", "edge_runtime", "bench") for p in sorted((REPO_ROOT / d).rglob("*.py"))
           if p != REPO_ROOT / "plugin" / "protocol" / "errors.py"]  # where the external words are read, once
READS_TEXT = re.compile(r"\bin\s+(str\(\w+\)|\w*(message|msg)\w*\)?\s*(for|:|\)|$|and|or))", re.M)  # `... in str(e)`


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_no_error_is_matched_by_its_words(path: Path):
    """Codes decide, not sentences: no other module names an external error's words or reads an error's text
    (this catches the matching that reconnect.py and triton_link.py did before codes)."""
    text = path.read_text()
    for signature in EXTERNAL_SIGNATURES:
        assert signature.words not in text, f"{path}: {signature.words!r} belongs to plugin/protocol/errors.py"
    found = READS_TEXT.search(text)
    assert found is None, f"{path} matches an error's words: {found.group(0)!r}"
