"""cloud_partition: resumes each session at its split layer with its own KV (plugin/split/cloud.py)."""
from plugin.serving.services import CloudPartitionService
from plugin.serving.triton_adapter import model_class

TritonPythonModel = model_class(CloudPartitionService)
