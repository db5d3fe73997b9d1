"""A tiny bundle built by hand for the runtime, bench and serve tests, its numpy reference, and a slow Runtime.

The bundle is an embedding Gather + masked mean pool + MatMul head, written with onnx.helper, plus a
WordLevel tokenizer; the switchable variant takes its head as overridable initializers of size zero.
Import it from a test (`from tiny_bundle import make_bundle`; pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from edgelora.runtime import AdapterEntry, Runtime

HIDDEN = 8
MAX_LENGTH = 6
WORDS = ["[PAD]", "[UNK]", "the", "a", "good", "bad", "film", "movie", "great", "awful"]
WORDS += [f"w{i}" for i in range(50 - len(WORDS))]
# fp32 graph vs float64 numpy: a mean over <= MAX_LENGTH rows and one small matmul
ATOL = 1e-5
TEXTS = ["the good film", "a bad movie w3 w4 w5 w6 w7 w8", "great"]


@dataclass
class Tiny:
    """A tiny bundle on disk and the weights that make its numpy reference."""

    path: Path
    emb: np.ndarray
    heads: dict[str | None, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _graph(emb: np.ndarray, head: tuple[np.ndarray, np.ndarray] | None) -> onnx.ModelProto:
    """Gather -> masked mean pool -> embeddings -> MatMul + Add -> logits; head None makes it switchable."""
    t = TensorProto
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["x"]),  # (batch, seq, hidden)
        helper.make_node("Cast", ["attention_mask"], ["m"], to=t.FLOAT),
        helper.make_node("Unsqueeze", ["m", "ax_last"], ["m3"]),  # (batch, seq, 1)
        helper.make_node("Mul", ["x", "m3"], ["xm"]),
        helper.make_node("ReduceSum", ["xm", "ax1"], ["s"], keepdims=0),
        helper.make_node("ReduceSum", ["m3", "ax1"], ["c"], keepdims=0),
        helper.make_node("Div", ["s", "c"], ["embeddings"]),  # (batch, hidden)
        helper.make_node("MatMul", ["embeddings", "head.weight"], ["z"]),
        helper.make_node("Add", ["z", "head.bias"], ["logits"]),  # (batch, num_labels)
    ]
    w, b = head if head is not None else (np.zeros((HIDDEN, 0), np.float32), np.zeros((0,), np.float32))
    inits = [
        numpy_helper.from_array(emb, "emb"),
        numpy_helper.from_array(np.array([-1], np.int64), "ax_last"),
        numpy_helper.from_array(np.array([1], np.int64), "ax1"),
        numpy_helper.from_array(w, "head.weight"),
        numpy_helper.from_array(b, "head.bias"),
    ]
    inputs = [helper.make_tensor_value_info(n, t.INT64, ["batch", "seq"]) for n in ("input_ids", "attention_mask")]
    labels_dim: int | str = w.shape[1] if head is not None else "num_labels"
    if head is None:  # overridable initializers: graph inputs with same-named zero-size defaults
        inputs += [
            helper.make_tensor_value_info("head.weight", t.FLOAT, [HIDDEN, "num_labels"]),
            helper.make_tensor_value_info("head.bias", t.FLOAT, ["num_labels"]),
        ]
    outputs = [
        helper.make_tensor_value_info("logits", t.FLOAT, ["batch", labels_dim]),
        helper.make_tensor_value_info("embeddings", t.FLOAT, ["batch", HIDDEN]),
    ]
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def write_adapter(path: Path, w: np.ndarray, b: np.ndarray) -> None:
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({"head.weight": ort.OrtValue.ortvalue_from_numpy(w),
                        "head.bias": ort.OrtValue.ortvalue_from_numpy(b)})
    fmt.export_adapter(str(path))


def write_manifest(path: Path, manifest: dict) -> None:
    """Refresh every sha256 in `files` from disk and write manifest.json."""
    manifest["files"] = {rel: _sha(path / rel) for rel in manifest["files"]}
    for a in manifest["adapters"]:
        if a["file"]:
            a["sha256"] = manifest["files"][a["file"]]
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2))


def make_bundle(root: Path, mode: str = "merged", precision: str = "fp32", seed: int = 0) -> Tiny:
    """Write a tiny bundle: merged (adapter "sentiment", 2 labels) or switchable ("sentiment" + "topic")."""
    rng = np.random.default_rng(seed)
    path = root / f"tiny-{mode}-{precision}"
    (path / "adapters").mkdir(parents=True)
    emb = rng.standard_normal((len(WORDS), HIDDEN)).astype(np.float32)
    tiny = Tiny(path, emb)
    specs = {"sentiment": ["neg", "pos"], "topic": ["art", "sport", "news"]}
    heads = {n: (rng.standard_normal((HIDDEN, len(lab))).astype(np.float32),
                 rng.standard_normal(len(lab)).astype(np.float32)) for n, lab in specs.items()}
    files = ["model.onnx", "tokenizer.json"]
    if mode == "merged":
        tiny.heads = {None: heads["sentiment"], "sentiment": heads["sentiment"]}
        onnx.save(_graph(emb, heads["sentiment"]), path / "model.onnx")
        adapters = [AdapterEntry.create("sentiment", kind="lora", labels=specs["sentiment"], switchable=False).to_dict()]
    else:
        tiny.heads = dict(heads)
        onnx.save(_graph(emb, None), path / "model.onnx")
        adapters = []
        for name, labels in specs.items():
            entry = AdapterEntry.create(name, kind="lora", labels=labels, switchable=True)
            write_adapter(path / entry.file, *heads[name])
            files.append(entry.file)
            adapters.append(entry.to_dict())
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(path / "tokenizer.json"))
    manifest = {
        "format": "edgelora-bundle", "format_version": 1, "edgelora_version": "0.1.0",
        "mode": mode, "precision": precision,
        "base": {"name": "tiny", "fingerprint": "0" * 64, "architecture": "tiny", "hidden_size": HIDDEN},
        "inputs": ["input_ids", "attention_mask"], "outputs": ["logits", "embeddings"],
        "tokenizer": {"file": "tokenizer.json", "max_length": MAX_LENGTH},
        "adapters": adapters, "files": dict.fromkeys(files), "quantization": None, "validation": {},
    }
    write_manifest(path, manifest)
    return tiny


def reference(tiny: Tiny, texts: list[str], adapter: str | None) -> tuple[np.ndarray, np.ndarray]:
    """numpy logits and embeddings, tokenizing each text alone (so padding must not change results)."""
    ids = [[WORDS.index(w) if w in WORDS else 1 for w in t.split()][:MAX_LENGTH] for t in texts]
    pooled = np.stack([tiny.emb[i].astype(np.float64).mean(axis=0) for i in ids])  # (batch, hidden)
    if adapter not in tiny.heads:
        return np.zeros((len(texts), 0)), pooled
    w, b = tiny.heads[adapter]
    return pooled @ w + b, pooled


class SlowRuntime(Runtime):
    """A Runtime whose predict takes at least `delay` seconds: keeps a request in flight on purpose."""

    delay = 0.3

    def predict(self, *args, **kwargs):
        time.sleep(self.delay)
        return super().predict(*args, **kwargs)
