"""cloud_only: the baseline, the whole model in the cloud fed with token ids (plugin/cloud.py)."""
from plugin.serving.triton_adapter import model_class

TritonPythonModel = model_class("cloud_only")
