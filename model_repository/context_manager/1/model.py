"""context_manager: keeps each edge session's uploaded layer-k rows (plugin/split/context.py)."""
from plugin.serving.services import ContextManagerService
from plugin.serving.triton_adapter import model_class

TritonPythonModel = model_class(ContextManagerService)
