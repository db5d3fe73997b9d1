"""Loading the parts of a bundle into ONNX Runtime: the session (with its optimized-graph cache), the
tokenizer, and `.onnx_adapter` files checked against the graph's adapter inputs. `Runtime` (runtime/runtime.py)
holds what these return; nothing here runs a model. Imports no torch.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import onnxruntime as ort

from edgelora.errors import EdgeloraError
from edgelora.runtime.bundle import ADAPTER_IDS, LOGITS_TO_KEEP, MODEL_FILE, Manifest, TokenizerSpec

_PAD_TOKENS = ("[PAD]", "<pad>", "<|pad|>", "<PAD>")


def first_line(exc: BaseException) -> str:
    """ORT errors carry C++ source paths and several lines; keep the part a user can read."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\S+\.(?:cc|cpp|h):\d+ .*?\)\s+(?=[A-Z])", "", text)  # C++ file:line and signature
    # ORT's "[ONNXRuntimeError] : 2 : " prefix; a message without it (one of ours, already readable) stays whole
    return re.sub(r"^\[ONNXRuntimeError\] : \d+ : ", "", text)[:300]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def check_requires(m: Manifest, bundle: Path) -> None:
    """Refuse, in one line, a bundle whose graph needs a newer onnxruntime than the one installed (switchable
    bundles use ONNX's Attention, opset 23, which ORT's CPU runs from 1.23)."""
    need = m.requires.onnxruntime if m.requires is not None else None
    if need is not None and _version(ort.__version__) < _version(need):
        raise EdgeloraError(f"{bundle / MODEL_FILE} needs onnxruntime>={need} (installed: {ort.__version__}); "
                            f"pip install -U 'onnxruntime>={need}'")


def session_options(level: ort.GraphOptimizationLevel, threads: int, spinning: bool) -> ort.SessionOptions:
    """One sequential CPU session's options: `threads` intra-op threads, idle threads spinning or not."""
    so = ort.SessionOptions()
    flag = "1" if spinning else "0"
    so.graph_optimization_level = level
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3  # ORT warns on every overridable initializer; errors still surface
    so.add_session_config_entry("session.intra_op.allow_spinning", flag)
    so.add_session_config_entry("session.inter_op.allow_spinning", flag)
    return so


def load_session(bundle_dir: Path, manifest: Manifest, isa: str, *, threads: int, spinning: bool,
                 use_cache: bool) -> ort.InferenceSession:
    """The bundle's model.onnx in an ORT CPU session; with `use_cache`, its optimized graph is saved under
    `<bundle>/.cache/` (keyed by model sha256, ORT version and `isa`) and loaded from there next time."""
    model = bundle_dir / MODEL_FILE
    sha = str(manifest.files[MODEL_FILE])[:12]
    cache = bundle_dir / ".cache" / f"model.{sha}.{ort.__version__}.{isa}.opt.onnx"
    providers = ["CPUExecutionProvider"]
    if use_cache and cache.is_file() and cache.stat().st_mtime >= model.stat().st_mtime:
        try:  # already optimized offline: ORT's docs say load it with optimizations off
            return ort.InferenceSession(str(cache), session_options(ort.GraphOptimizationLevel.ORT_DISABLE_ALL, threads, spinning),
                                        providers=providers)
        except Exception:  # noqa: BLE001 - a stale or damaged cache is rebuilt from model.onnx below
            pass
    so = session_options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL, threads, spinning)
    tmp = None
    if use_cache:
        try:
            cache.parent.mkdir(exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=cache.name + ".", suffix=".tmp")
            os.close(fd)
            so.optimized_model_filepath = tmp
        except OSError:  # read-only bundle: run without a cache
            tmp = None
    try:
        session = ort.InferenceSession(str(model), so, providers=providers)
    except Exception as e:  # noqa: BLE001 - ORT raises several unrelated types for a bad model
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise EdgeloraError(
            f"{model}: onnxruntime cannot load it ({first_line(e)}); re-export the bundle"
        ) from None
    if tmp:
        try:
            os.replace(tmp, cache)  # atomic: a concurrent loader sees the old cache or the whole new one
        except OSError:
            Path(tmp).unlink(missing_ok=True)
        for old in cache.parent.glob("model.*.opt.onnx"):  # caches of a model.onnx since replaced
            if not old.name.startswith(f"model.{sha}."):
                old.unlink(missing_ok=True)
    return session


def load_tokenizer(bundle_dir: Path, spec: TokenizerSpec | None):
    """The bundle's tokenizer, truncating to `spec.max_length` and padding each batch to its longest row;
    None for a bundle without one."""
    if spec is None:
        return None
    from tokenizers import Tokenizer

    path = bundle_dir / spec.file
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - the Rust side raises a bare Exception
        raise EdgeloraError(f"{path}: not a readable tokenizers JSON file ({first_line(e)}); re-export") from None
    tok.enable_truncation(max_length=spec.max_length)
    pad = tok.padding or {}
    pad_token = pad.get("pad_token")
    if pad_token is None or tok.token_to_id(pad_token) is None:
        pad_token = next((t for t in _PAD_TOKENS if tok.token_to_id(t) is not None), None)
    pad_id = tok.token_to_id(pad_token) if pad_token else 0  # padded positions are masked out anyway
    tok.enable_padding(pad_id=pad_id, pad_token=pad_token or tok.id_to_token(0) or "[PAD]",
                       pad_type_id=pad.get("pad_type_id", 0), direction=pad.get("direction", "right"))
    return tok  # enable_padding without length pads each batch to its longest row


def load_adapter(session: ort.InferenceSession, path: Path,
                 bank_entries: int | None = None) -> tuple[ort.RunOptions, ort.LoraAdapter]:
    """RunOptions activating the `.onnx_adapter` at `path`, after checking every parameter against the
    graph's adapter inputs (and, for a bank, that each holds `bank_entries` entries), and the loaded adapter,
    which must stay alive as long as the RunOptions are used."""
    slots = {i.name: i for i in session.get_overridable_initializers()}
    try:
        params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    except Exception as e:  # noqa: BLE001
        raise EdgeloraError(f"{path}: not a valid .onnx_adapter file ({first_line(e)}); re-export it") from None
    for name, value in params.items():
        slot = slots.get(name)
        if slot is None:
            raise EdgeloraError(
                f"{path}: parameter {name!r} is not an adapter input of model.onnx; "
                "this adapter was exported for another base, re-export it against this bundle"
            )
        shape = value.shape()
        fits = len(shape) == len(slot.shape) and all(
            not isinstance(want, int) or want == got for want, got in zip(slot.shape, shape)
        )
        if not fits or value.data_type() != slot.type:
            raise EdgeloraError(
                f"{path}: parameter {name!r} is {value.data_type()}{list(shape)}, model.onnx expects "
                f"{slot.type}{list(slot.shape)}; re-export the adapter against this bundle"
            )
        if bank_entries is not None and shape[0] != bank_entries:
            raise EdgeloraError(
                f"{path}: parameter {name!r} holds {shape[0]} entries, manifest.json's bank lists "
                f"{bank_entries}; re-export the bundle or re-run `edgelora add-adapter`"
            )
    if bank_entries is not None:
        slot_names = {n for n in slots if n not in (ADAPTER_IDS, LOGITS_TO_KEEP)}  # run inputs, not parameters
        if set(params) != slot_names:
            raise EdgeloraError(
                f"{path}: the adapter bank lacks {sorted(slot_names - set(params))[:3]}; a bank must fill "
                "every adapter input; re-export the bundle or re-run `edgelora add-adapter`"
            )
    adapter = ort.LoraAdapter()
    try:
        adapter.Load(str(path))
    except Exception as e:  # noqa: BLE001
        raise EdgeloraError(
            f"{path}: onnxruntime cannot load the adapter ({first_line(e)}); re-export it"
        ) from None
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    return options, adapter
