"""Build artifacts: the graph manifest, ONNX export and parity, TensorRT engines."""
