"""cloud_partition: resumes each session at its split layer with its own KV (plugin/cloud.py)."""
from plugin.serving.triton_adapter import model_class

TritonPythonModel = model_class("cloud_partition")
