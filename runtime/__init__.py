"""ONNX Runtime on CPU: load bundles, switch adapters, generate text, benchmark. Imports no torch.

`Runtime` runs a bundle (and generates text with a decoder bundle through `Generator`); `read_manifest`
reads and checks one (the format lives in `edgelora.runtime.bundle`, which the exporters write through);
`detect_isa` says what the CPU's int8 kernels can do. The benchmark harness lives in
`edgelora.runtime.bench` (not imported here: its worker runs as `python -m`).
"""

from edgelora.runtime.bundle import AdapterEntry, Manifest, read_manifest
from edgelora.runtime.cpu import CpuInfo, detect_isa, int8_saturates, recommended_weight_bits
from edgelora.runtime.generate import Generator
from edgelora.runtime.runtime import Runtime

__all__ = ["AdapterEntry", "CpuInfo", "Generator", "Manifest", "Runtime", "detect_isa", "int8_saturates", "read_manifest",
           "recommended_weight_bits"]
