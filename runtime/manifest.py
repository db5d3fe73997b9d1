"""The bundle format's names and its typed manifest: what manifest.json may say, checked field by field.

`Manifest.from_dict` holds every check a manifest must pass, each failure one line naming the file and the
field; `to_dict` gives back the same JSON. Reading and writing whole bundles (files, sha256, atomic
replacement) is `edgelora.runtime.bundle`'s, which re-exports every name here: exporters and the runtime
import the format from there. Imports no torch and nothing from the training side.

Format versions: 1 for encoder bundles (sequence and token classification, embeddings); 2 for decoder
bundles (task "causal-lm", with a `generation` record), so that a runtime reading only version 1 refuses
them with its "upgrade edgelora" line rather than misreading them.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from edgelora.errors import EdgeloraError

FORMAT = "edgelora-bundle"
FORMAT_VERSION = 2  # the newest bundle format this edgelora reads and writes
ENCODER_FORMAT_VERSION = 1  # encoder bundles stay readable by every edgelora that reads bundles
DECODER_FORMAT_VERSION = 2  # task "causal-lm": refused by runtimes that read up to 1

MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
ADAPTERS_DIR = "adapters"
BANK_FILE = "bank.onnx_adapter"  # outside adapters/, so no adapter name can collide with it
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_FILES = (TOKENIZER_FILE,)  # copied from the base into every bundle
DECODER_TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "chat_template.jinja")  # decoders: + chat template

ADAPTER_IDS = "adapter_ids"  # int64 [batch] overridable initializer of banked switchable graphs: each row's bank entry
LOGITS_TO_KEEP = "logits_to_keep"  # int64 scalar overridable initializer of decoder graphs: logits of the last N positions
ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")  # adapter names: also file names inside the bundle
ADAPTER_NAME_RULE = "letters, digits, '_' or '-'"

MODES = ("merged", "switchable")
PRECISIONS = ("fp32", "int8")
SEQUENCE_CLASSIFICATION = "sequence-classification"
TOKEN_CLASSIFICATION = "token-classification"
EMBEDDINGS = "embeddings"
CAUSAL_LM = "causal-lm"
TASKS = (SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION, EMBEDDINGS, CAUSAL_LM)
# How an adapter's head turns the last hidden state into logits (`edgelora.heads` computes them): ours
# mean-pools; the others are the heads of transformers' ...ForSequenceClassification, which PEFT's SEQ_CLS
# adapters carry. A manifest written before the field means MEAN_POOLED for an adapter with labels.
MEAN_POOLED = "mean-pooled"
PER_TOKEN = "per-token"  # token classification: one linear layer over every token of the last hidden state
HEADS = (MEAN_POOLED, "bert-pooler", "roberta", "distilbert", "last-token", PER_TOKEN)


def adapter_file(name: str) -> str:
    """Where a switchable bundle keeps adapter `name`: `adapters/<name>.onnx_adapter`."""
    return f"{ADAPTERS_DIR}/{name}.onnx_adapter"


def format_version_for(task: str) -> int:
    """The format version a manifest of `task` is written with."""
    return DECODER_FORMAT_VERSION if task == CAUSAL_LM else ENCODER_FORMAT_VERSION


def encoder_task(adapters: Sequence[AdapterEntry]) -> str:
    """The task of an encoder bundle from its adapters: classification where one has labels, else embeddings.
    Also what a manifest written before the `task` field means."""
    return SEQUENCE_CLASSIFICATION if any(a.labels for a in adapters) else EMBEDDINGS


def decoder_inputs(num_layers: int, position_ids: bool = True) -> tuple[str, ...]:
    """A decoder graph's inputs, as Optimum names them: ids, mask, positions, then each layer's past key and value."""
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ("input_ids", "attention_mask", *(["position_ids"] if position_ids else []), *past)


def decoder_outputs(num_layers: int) -> tuple[str, ...]:
    """A decoder graph's outputs, as Optimum names them: logits, then each layer's present key and value."""
    return ("logits", *[f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")])


# --- records ------------------------------------------------------------------------------------------------
# Each record's fields are its JSON keys, in the order they are written; `extra` keeps keys this version does
# not know, written after them. A field marked `_omitted` is left out of the JSON while None (the key is
# absent, as the exporters have always written it); the others are written as null.


def _omitted() -> Any:
    return field(default=None, metadata={"omit_none": True})


def _extra() -> Any:
    return field(default_factory=dict, compare=False)


def _json(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_json(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _json(v) for k, v in value.items()}
    return value


def _to_dict(record: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if f.name == "extra" or (value is None and f.metadata.get("omit_none")):
            continue
        out[f.name] = _json(value)
    out.update({k: _json(v) for k, v in record.extra.items()})
    return out


def _split(cls: type, data: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(known fields, unknown keys) of a JSON object for record `cls`."""
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    return {k: v for k, v in data.items() if k in names}, {k: v for k, v in data.items() if k not in names}


def _is_int(value: object, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _safe_relpath(rel: object, source: object) -> str:
    p = PurePosixPath(str(rel))
    if not isinstance(rel, str) or not rel or p.is_absolute() or ".." in p.parts:
        raise EdgeloraError(f"{source}: file entry {rel!r} must be a relative path inside the bundle; re-export it")
    return rel


class _Bad(Exception):
    """A nested record failed a check; the manifest turns it into its one-line error about the whole field."""


class _Record:
    """What every record shares: its JSON object."""

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)


@dataclass(frozen=True, kw_only=True)
class BaseInfo(_Record):
    """The base model a bundle was exported from: its fingerprint is what adapters added later must match."""

    name: str | None = None
    fingerprint: str | None = None
    architecture: str | None = None
    hidden_size: int | None = None
    vocab_size: int | None = _omitted()  # only where the bundle has no tokenizer to say it
    extra: Mapping[str, Any] = _extra()

    @classmethod
    def from_dict(cls, data: object) -> BaseInfo:
        if not isinstance(data, Mapping):
            raise _Bad
        known, extra = _split(cls, data)
        if not all(known.get(k) is None or isinstance(known[k], str) for k in ("name", "fingerprint", "architecture")) \
                or not all(known.get(k) is None or _is_int(known[k], 1) for k in ("hidden_size", "vocab_size")):
            raise _Bad
        return cls(**known, extra=extra)


@dataclass(frozen=True, kw_only=True)
class TokenizerSpec(_Record):
    """The bundle's tokenizer file and the length texts are truncated to (the base's positions at most)."""

    file: str
    max_length: int
    extra: Mapping[str, Any] = _extra()

    @classmethod
    def from_dict(cls, data: object) -> TokenizerSpec:
        if not (isinstance(data, Mapping) and isinstance(data.get("file"), str) and _is_int(data.get("max_length"), 1)):
            raise _Bad
        known, extra = _split(cls, data)
        return cls(**known, extra=extra)


@dataclass(frozen=True, kw_only=True)
class AdapterEntry(_Record):
    """One adapter of a bundle: its name, labels (the logits' columns; none for embeddings and decoders), and in
    switchable mode its `.onnx_adapter` file. Build new ones with `AdapterEntry.create`."""

    name: str
    kind: str | None = None  # "lora" or "bottleneck"
    labels: tuple[str, ...] = ()
    file: str | None = None
    sha256: str | None = None  # of `file`; `write_bundle` fills it in
    source_sha256: str | None = None  # of the adapter weights exported (adapter_model.safetensors)
    trained_with: Mapping[str, Any] | None = None  # the fake-quant recipe trained with: weight_bits, modes
    warning: str | None = _omitted()
    head: str | None = _omitted()  # one of HEADS where the adapter has labels; None: no head (embeddings)
    extra: Mapping[str, Any] = _extra()

    @classmethod
    def create(cls, name: str, *, kind: str, labels: Sequence[str], switchable: bool, source_sha256: str | None = None,
               trained_with: Mapping[str, Any] | None = None, warning: str | None = None,
               head: str | None = None) -> AdapterEntry:
        """A new entry: in switchable mode its file is `adapters/<name>.onnx_adapter`; sha256 comes on writing.
        `head`: the kind of head (HEADS); an adapter with labels and no kind given has ours, MEAN_POOLED."""
        if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
            raise EdgeloraError(f"adapter name {name!r} must be {ADAPTER_NAME_RULE}")
        return cls(name=name, kind=kind, labels=tuple(labels), file=adapter_file(name) if switchable else None,
                   source_sha256=source_sha256, trained_with=trained_with, warning=warning,
                   head=(head or MEAN_POOLED) if labels else None)

    @classmethod
    def from_dict(cls, data: object) -> AdapterEntry:
        if not (isinstance(data, Mapping) and isinstance(data.get("name"), str)):
            raise _Bad
        labels = data.get("labels", [])
        if not (isinstance(labels, list) and all(isinstance(label, str) for label in labels)):
            raise _Bad
        known, extra = _split(cls, data)
        for key in ("kind", "file", "sha256", "source_sha256", "warning", "head"):
            if known.get(key) is not None and not isinstance(known[key], str):
                raise _Bad
        head = known.get("head") or (MEAN_POOLED if labels else None)  # before the field: ours, mean-pooled
        return cls(**{**known, "labels": tuple(labels), "head": head}, extra=extra)


@dataclass(frozen=True, kw_only=True)
class Bank(_Record):
    """A switchable bundle's adapter bank: one file holding every adapter, entry i for `adapter_ids` == i
    (None: the all-zero "no adapter" entry)."""

    file: str
    adapters: tuple[str | None, ...]
    extra: Mapping[str, Any] = _extra()

    @classmethod
    def from_dict(cls, data: object) -> Bank:
        order = data.get("adapters") if isinstance(data, Mapping) else None
        if not (isinstance(data, Mapping) and isinstance(data.get("file"), str) and isinstance(order, list)
                and all(n is None or isinstance(n, str) for n in order)):
            raise _Bad
        known, extra = _split(cls, data)
        return cls(**{**known, "adapters": tuple(order)}, extra=extra)


@dataclass(frozen=True, kw_only=True)
class Requires(_Record):
    """What the graph needs of the installed runtime: the lowest onnxruntime version ("MAJOR.MINOR")."""

    onnxruntime: str | None = _omitted()
    extra: Mapping[str, Any] = _extra()

    @classmethod
    def from_dict(cls, data: object) -> Requires:
        if not (isinstance(data, Mapping) and isinstance(data.get("onnxruntime", ""), str)
                and re.fullmatch(r"\d+(\.\d+)*", data.get("onnxruntime", "0"))):
            raise _Bad
        known, extra = _split(cls, data)
        return cls(**known, extra=extra)


@dataclass(frozen=True, kw_only=True)
class Quantization(_Record):
    """An int8 bundle's quantization: the weight bits and the CPU it was tuned for are what the runtime
    checks; the rest records how the exporter quantized (activations, recipe, fp32 layers, smoothing)."""

    scheme: str | None = _omitted()
    int8_scheme: str | None = _omitted()  # decoders: "rowwise" (MatMulIntegerToFloat); absent: "block" (MatMulNBits)
    activations: Mapping[str, Any] | None = _omitted()  # {"mode": "dynamic" | "static" | "per-row", ...}
    weight_bits: int
    weight_bits_from: str | None = _omitted()
    isa: str | None = _omitted()
    quantized_matmuls: int | None = _omitted()
    qattention_nodes: int | None = _omitted()
    recipe: Mapping[str, Any] | None = _omitted()  # the QuantConfig, as edgelora.config writes it
    fp32_layers: tuple[str, ...] | None = _omitted()
    fp32_layers_from: Mapping[str, Any] | None = _omitted()
    smoothing: Mapping[str, Any] | None = _omitted()  # {"alpha", "from", "digest", ...}
    excluded: str | None = _omitted()
    extra: Mapping[str, Any] = _extra()

    @property
    def activation_mode(self) -> str:
        """"static" (calibrated ranges baked into the graph) or "dynamic" (ranges per run)."""
        return (self.activations or {}).get("mode", "dynamic")

    @property
    def smoothing_digest(self) -> str | None:
        """Digest of the SmoothQuant factors baked into the base graph, or None when unsmoothed."""
        return (self.smoothing or {}).get("digest")

    @classmethod
    def from_dict(cls, data: object) -> Quantization:
        if not (isinstance(data, Mapping) and _is_int(data.get("weight_bits"), 1)):
            raise _Bad
        known, extra = _split(cls, data)
        for key in ("activations", "recipe", "fp32_layers_from", "smoothing"):
            if known.get(key) is not None and not isinstance(known[key], Mapping):
                raise _Bad
        layers = known.get("fp32_layers")
        if layers is not None and not (isinstance(layers, list) and all(isinstance(n, str) for n in layers)):
            raise _Bad
        if layers is not None:
            known["fp32_layers"] = tuple(layers)
        return cls(**known, extra=extra)


@dataclass(frozen=True, kw_only=True)
class Generation(_Record):
    """What a decoder bundle (task "causal-lm") needs to generate: the KV cache's shape, the special tokens and
    the chat template (Jinja text, or None for a base model without one)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    context_length: int  # positions the base has: prompt plus generated tokens
    eos_token_ids: tuple[int, ...]
    vocab_size: int | None = None  # width of the logits
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    chat_template: str | None = None
    extra: Mapping[str, Any] = _extra()

    @classmethod
    def from_dict(cls, data: object, source: object) -> Generation:
        def bad(key: str, want: str) -> EdgeloraError:
            got = data.get(key) if key in data else "missing"
            return EdgeloraError(f"{source}: generation.{key} is {got!r}, expected {want}; re-export the bundle")

        if not isinstance(data, Mapping):
            raise EdgeloraError(f"{source}: generation is {data!r}, expected a mapping for task {CAUSAL_LM!r}; "
                                "re-export the bundle")
        for key in ("num_layers", "num_kv_heads", "head_dim", "context_length"):
            if not _is_int(data.get(key), 1):
                raise bad(key, "a positive integer")
        eos = data.get("eos_token_ids")
        if not (isinstance(eos, list) and all(_is_int(t) for t in eos)):  # empty: a base that never stops itself
            raise bad("eos_token_ids", "a list of token ids")
        for key in ("bos_token_id", "pad_token_id"):
            if data.get(key) is not None and not _is_int(data[key]):
                raise bad(key, "a token id or null")
        if data.get("vocab_size") is not None and not _is_int(data["vocab_size"], 1):
            raise bad("vocab_size", "a positive integer or null")
        if data.get("chat_template") is not None and not isinstance(data["chat_template"], str):
            raise bad("chat_template", "a Jinja template string or null")
        known, extra = _split(cls, data)
        return cls(**{**known, "eos_token_ids": tuple(eos)}, extra=extra)


@dataclass(frozen=True, kw_only=True)
class Manifest(_Record):
    """A bundle's manifest.json, typed. Fields the exporter records for people and for `add-adapter`
    (fusions, validation figures, slots) stay JSON objects; keys unknown to this version stay in `extra`.

    Example:
        >>> m = read_manifest("bundles/minilm-int8")  # doctest: +SKIP
        >>> m.mode, m.task, [a.name for a in m.adapters]  # doctest: +SKIP
        ('switchable', 'sequence-classification', ['intent', 'topic'])
    """

    edgelora_version: str | None = None
    mode: str
    precision: str
    task: str
    base: BaseInfo | None = None
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    tokenizer: TokenizerSpec | None = None
    adapters: tuple[AdapterEntry, ...] = ()
    quantization: Quantization | None = None
    fusions: Mapping[str, Any] | None = None  # what ORT fusions were applied (exporters/fusion.py)
    requires: Requires | None = _omitted()
    isa: str | None = None  # the CPU the bundle was exported on
    validation: Mapping[str, Any] = field(default_factory=dict)  # the export's comparison with torch
    warnings: tuple[str, ...] | None = _omitted()
    slots: Mapping[str, Any] | None = _omitted()  # switchable: the layers with adapter slots (exporters/switchable.py)
    bank: Bank | None = _omitted()
    generation: Generation | None = _omitted()  # task "causal-lm" only
    format: str = FORMAT
    format_version: int = 0  # 0: the version the task needs (`format_version_for`)
    files: Mapping[str, str] = field(default_factory=dict)  # relative path -> sha256; `write_bundle` fills it in
    extra: Mapping[str, Any] = _extra()

    def __post_init__(self) -> None:
        if self.format_version == 0:
            object.__setattr__(self, "format_version", format_version_for(self.task))

    def entry(self, name: str) -> AdapterEntry | None:
        """The adapter entry called `name`, or None."""
        return next((a for a in self.adapters if a.name == name), None)

    @property
    def adapter_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.adapters)

    def to_json(self) -> str:
        """The manifest as manifest.json holds it (keys in the order exporters have always written them)."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, m: object, source: object = MANIFEST_FILE) -> Manifest:
        """A checked manifest from its JSON; EdgeloraError (one line naming `source` and the field) if malformed."""
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            got = m.get("format") if isinstance(m, dict) else type(m).__name__
            raise EdgeloraError(f"{source}: format is {got!r}, not {FORMAT!r}; this is not an edgelora bundle")
        version = m.get("format_version")
        if not _is_int(version, 1):
            raise EdgeloraError(f"{source}: format_version {version!r} is not a positive integer; re-export the bundle")
        if version > FORMAT_VERSION:
            raise EdgeloraError(
                f"{source}: written by a newer edgelora (format_version {version}, this one reads up to "
                f"{FORMAT_VERSION}); upgrade edgelora"
            )

        def bad(key: str, want: str) -> EdgeloraError:
            return EdgeloraError(f"{source}: {key} is {m.get(key)!r}, expected {want}; re-export the bundle")

        def record(key: str, parse: Callable[[object], Any], want: str) -> Any:
            if m.get(key) is None:
                return None
            try:
                return parse(m[key])
            except _Bad:
                raise bad(key, want) from None

        if m.get("mode") not in MODES:
            raise bad("mode", "'merged' or 'switchable'")
        if m.get("precision") not in PRECISIONS:
            raise bad("precision", "'fp32' or 'int8'")
        for key in ("inputs", "outputs"):
            v = m.get(key)
            if not isinstance(v, list) or not v or not all(isinstance(s, str) for s in v):
                raise bad(key, "a non-empty list of names")
        files = m.get("files")
        if not isinstance(files, dict):
            raise bad("files", "a mapping of file name to sha256")
        for rel in files:
            _safe_relpath(rel, source)
        if "edgelora_version" in m and m["edgelora_version"] is not None and not isinstance(m["edgelora_version"], str):
            raise bad("edgelora_version", "a version string")
        requires = record("requires", Requires.from_dict, "null or {'onnxruntime': 'MAJOR.MINOR'}")
        tokenizer = record("tokenizer", TokenizerSpec.from_dict, "null or {'file': str, 'max_length': positive int}")
        base = record("base", BaseInfo.from_dict, "null or {'name': str, 'fingerprint': str, ...}")
        quantization = record("quantization", Quantization.from_dict, "null or {'weight_bits': positive int, ...}")
        if not isinstance(m.get("adapters"), list):
            raise bad("adapters", "a list of {'name': str, 'labels': [str, ...], ...}")
        try:
            adapters = tuple(AdapterEntry.from_dict(a) for a in m["adapters"])
        except _Bad:
            raise bad("adapters", "a list of {'name': str, 'labels': [str, ...], ...}") from None
        names = [a.name for a in adapters]
        if len(set(names)) != len(names):
            raise EdgeloraError(f"{source}: adapter names repeat ({', '.join(names)}); re-export the bundle")
        mode = m["mode"]
        if mode == "merged" and len(adapters) > 1:
            raise EdgeloraError(f"{source}: a merged bundle holds at most one adapter, found {len(adapters)}; re-export it")
        bank = None
        if mode == "switchable":
            for a in adapters:
                if a.file is None:
                    raise EdgeloraError(f"{source}: adapter {a.name!r} has no 'file'; re-export the bundle")
                _safe_relpath(a.file, source)
            bank = record("bank", Bank.from_dict, "null or {'file': str, 'adapters': [name or null, ...]}")
            if bank is not None:
                _safe_relpath(bank.file, source)
        for key in ("fusions", "slots"):
            if m.get(key) is not None and not isinstance(m[key], dict):
                raise bad(key, "null or a mapping")
        if not isinstance(m.get("validation", {}), dict):
            raise bad("validation", "a mapping")
        warnings = m.get("warnings")
        if warnings is not None and not (isinstance(warnings, list) and all(isinstance(w, str) for w in warnings)):
            raise bad("warnings", "a list of lines")

        task = m.get("task", encoder_task(adapters))  # before `task`, every bundle was an encoder's
        if task not in TASKS:
            raise bad("task", " or ".join(repr(t) for t in TASKS))
        generation = None
        if task == CAUSAL_LM:
            if version < DECODER_FORMAT_VERSION:
                raise EdgeloraError(f"{source}: task {CAUSAL_LM!r} needs format_version {DECODER_FORMAT_VERSION}, "
                                    f"found {version}; re-export the bundle")
            if m.get("generation") is None:
                raise bad("generation", f"a mapping for task {CAUSAL_LM!r}")
            generation = Generation.from_dict(m["generation"], source)
            missing = [n for n in decoder_inputs(generation.num_layers, position_ids=False) if n not in m["inputs"]]
            missing += [n for n in decoder_outputs(generation.num_layers) if n not in m["outputs"]]
            if missing:
                raise EdgeloraError(f"{source}: a {CAUSAL_LM} bundle of {generation.num_layers} layers lacks "
                                    f"inputs/outputs {missing[:3]}; re-export the bundle")
        elif m.get("generation") is not None:
            raise bad("generation", f"null: only task {CAUSAL_LM!r} generates")

        known, extra = _split(cls, m)
        return cls(**{**known, "inputs": tuple(m["inputs"]), "outputs": tuple(m["outputs"]), "task": task,
                      "requires": requires, "tokenizer": tokenizer, "base": base, "quantization": quantization,
                      "adapters": adapters, "bank": bank, "generation": generation, "files": dict(files),
                      "validation": m.get("validation", {}),
                      "warnings": tuple(warnings) if warnings is not None else None}, extra=extra)
