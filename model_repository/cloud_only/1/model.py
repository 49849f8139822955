"""cloud_only: the baseline, the whole model in the cloud fed with token ids (plugin/split/cloud.py)."""
from plugin.serving.services import CloudOnlyService
from plugin.serving.triton_adapter import model_class

TritonPythonModel = model_class(CloudOnlyService)
