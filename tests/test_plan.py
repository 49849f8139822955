"""Bad partition plans fail with a message that says what to fix."""
from __future__ import annotations

import json

import pytest

from edge_runtime.torch_runner import TorchRunner
from plugin.model.checkpoint import load_model
from plugin.split.edge import EdgePartition
from plugin.split.plan import PartitionPlan, PlanError
from tests.tiny_models import save_tiny


def _plan(**overrides) -> dict:
    raw = {"checkpoint": ".", "split_layer": 4, "exit_layers": [1, 3, 4], "threshold": 0.8, "codec": "fp16"}
    raw.update(overrides)
    return raw


@pytest.mark.parametrize("overrides, message", [
    ({"exit_layers": [3, 1]}, "strictly increasing"),
    ({"exit_layers": [1, 1, 3]}, "strictly increasing"),
    ({"exit_layers": [2, 5]}, "past the split layer"),
    ({"exit_layers": []}, "at least one exit"),
    ({"exit_layers": [0, 2]}, "positive integers"),
    ({"split_layer": 0}, "positive integer"),
    ({"threshold": 1.5}, "threshold"),
    ({"codec": "bf16"}, "codec must be one of"),
    ({"splt_layer": 3}, "unknown keys"),
    ({"split_layer": True}, r"split_layer must be a positive integer, got True \(JSON booleans are not numbers\)"),
    ({"split_layer": 4.0}, "split_layer must be a positive integer, got 4.0"),
    ({"exit_layers": [1, True]}, r"exit_layers must be positive integers, got \[1, True\]"),
    ({"exit_layers": 3}, "exit_layers must be a list of positive integers, got 3"),
    ({"threshold": True}, r"threshold must be a number in \[0, 1\], got True \(JSON booleans are not numbers\)"),
    ({"threshold": "0.5"}, r"threshold must be a number in \[0, 1\], got '0.5'"),
    ({"threshold": float("nan")}, r"threshold must lie in \[0, 1\], got nan"),
    ({"lookup_below": 1.5}, r"lookup_below must lie in \[0, 1\], got 1.5"),
    ({"lookup_below": True}, r"lookup_below must be a number in \[0, 1\], got True"),
])
def test_bad_plans_are_refused(overrides, message):
    with pytest.raises(PlanError, match=message):
        PartitionPlan.from_dict(_plan(**overrides))


def test_integer_thresholds_are_numbers():
    """threshold: 1 (YAML or JSON) is the number 1.0, and saved as such."""
    assert PartitionPlan.from_dict(_plan(threshold=1)).threshold == 1.0
    assert isinstance(PartitionPlan.from_dict(_plan(threshold=0)).threshold, float)


def test_missing_keys_are_named():
    with pytest.raises(PlanError, match="split_layer"):
        PartitionPlan.from_dict({"checkpoint": ".", "exit_layers": [1]})


def test_split_beyond_depth_is_refused(tmp_path):
    save_tiny("llama", tmp_path)  # 6 layers
    plan = PartitionPlan.from_dict(_plan(split_layer=6, exit_layers=[2]), base_dir=tmp_path)
    with pytest.raises(PlanError, match="beyond the model's depth.*6 layers"):
        EdgePartition(TorchRunner(load_model(tmp_path, range(0, 6))), plan)


def test_plan_round_trips_through_json_and_yaml(tmp_path):
    plan = PartitionPlan.from_dict(_plan(), base_dir=tmp_path)
    plan.save(tmp_path / "plan.json")
    assert json.loads((tmp_path / "plan.json").read_text())["checkpoint"] == "."
    assert PartitionPlan.load(tmp_path / "plan.json") == plan
    (tmp_path / "plan.yaml").write_text("checkpoint: .\nsplit_layer: 4\nexit_layers: [1, 3, 4]\nthreshold: 0.8\ncodec: fp16\n")
    assert PartitionPlan.load(tmp_path / "plan.yaml") == plan
    assert plan.boundaries == (1, 3, 4)
    assert "lookup_below" not in json.loads((tmp_path / "plan.json").read_text())  # 0, the default: not written
    looked = PartitionPlan.from_dict(_plan(lookup_below=0.5), base_dir=tmp_path)
    looked.save(tmp_path / "looked.json")
    assert PartitionPlan.load(tmp_path / "looked.json") == looked and looked.lookup_below == 0.5
