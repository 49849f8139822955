"""Where the repository keeps what the code ships with: the model repository and the demo model's plan."""
from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_REPOSITORY = REPO_ROOT / "model_repository"  # what `tritonserver --model-repository` serves
DEMO_PLAN = REPO_ROOT / "models" / "shakespeare-llama" / "partition_plan.json"
GEMMA_PLAN = REPO_ROOT / "models" / "gemma-3-270m-exits" / "partition_plan.json"  # `make demo`'s default
