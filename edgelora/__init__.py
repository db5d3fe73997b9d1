"""edgelora: train task adapters on a frozen transformer, export them to int8 ONNX, run them on CPUs.

This top-level module stays import-light (no torch): `edgelora.runtime` lives under it and is
installed on devices that have only onnxruntime, numpy and tokenizers.
"""

from edgelora.errors import EdgeloraError

__version__ = "0.1.0"
__all__ = ["EdgeloraError", "__version__"]
