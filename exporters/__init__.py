"""Torch -> ONNX: merge adapters, quantize to int8 with the shared quantizer, write bundles."""
