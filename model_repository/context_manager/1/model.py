"""context_manager: keeps each edge session's uploaded layer-k rows (plugin/context.py)."""
from plugin.serving.triton_adapter import model_class

TritonPythonModel = model_class("context_manager")
