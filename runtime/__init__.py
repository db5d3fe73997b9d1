"""ONNX Runtime on CPU: load bundles, switch adapters, generate text, benchmark. Imports no torch.

`Runtime` runs a bundle, `Generator` generates text with a decoder bundle; `detect_isa` says what the
CPU's int8 kernels can do. The benchmark harness lives in `edgelora.runtime.bench` (not imported here:
its worker runs as `python -m`).
"""

from edgelora.runtime.cpu import CpuInfo, detect_isa, int8_saturates, recommended_weight_bits
from edgelora.runtime.generate import Generator
from edgelora.runtime.runtime import Runtime, read_manifest

__all__ = ["CpuInfo", "Generator", "Runtime", "detect_isa", "int8_saturates", "read_manifest",
           "recommended_weight_bits"]
