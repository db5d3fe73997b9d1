"""Adapter directories in PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.

LoRA weights are stored under PEFT's keys (`base_model.model.<module>.lora_A.weight`), so PEFT loads our
LoRA adapters and we load PEFT's. Our extras (kind, quantization recipe, labels, head, base fingerprint)
sit in the same JSON under "edgelora", and our mean-pooled head under `edgelora_head.*`, which PEFT ignores.
An architecture's head (`edgelora.heads`) is stored as PEFT stores a SEQ_CLS adapter's `modules_to_save`
(`base_model.model.classifier.weight`, ...), both ways: PEFT's classifiers load here with their own head,
and ours load in PEFT on the matching AutoModelForSequenceClassification. A static int8 recipe's
calibrated activation ranges (per layer scale and zero point) are extras too, in the JSON.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from edgelora import smooth
from edgelora.atomic import interrupted_write_note, write_dir_atomic
from edgelora.calibrate import RANGES_KEY, load_ranges, ranges_to_dict
from edgelora.config import (
    BottleneckConfig,
    LoraConfig,
    QuantConfig,
    adapter_config_from_dict,
    config_to_dict,
    plain_lora_config,
)
from edgelora.errors import EdgeloraError
from edgelora.heads import ARCH_HEADS, HEAD_KINDS, MEAN_POOLED, PER_TOKEN, head_kind, out_key
from edgelora.layers import ADAPTER_KEYS, BOTTLENECK_KEY, LORA_A_KEY, LORA_B_KEY
from edgelora.model import AdapterModel, hidden_size, model_type
from edgelora.runtime.bundle import TOKEN_CLASSIFICATION

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
HEAD_PREFIX = "edgelora_head."
FORMAT_VERSION = 1


def check_adapter_out(out: str | Path) -> None:
    """Refuse an `out` that exists and is neither empty nor an adapter directory: replacing it would delete
    the user's files."""
    out = Path(out)
    if not out.exists() or (out.is_dir() and (not any(out.iterdir()) or (out / CONFIG_FILE).is_file())):
        return
    raise EdgeloraError(f"{out}: exists and is not an adapter directory; choose an empty or new directory for out")


def adapter_state(model: AdapterModel, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors under the keys its file holds (float32, on the CPU): PEFT's LoRA keys (a PiSSA
    adapter as the plain LoRA of the original base, `AdaptedLinear.lora_weights`), ours for bottlenecks and the head."""
    tensors: dict[str, torch.Tensor] = {}
    kind = head_kind(model.head_kind(name) or MEAN_POOLED)
    prefix = PEFT_PREFIX + backbone_prefix(model, name)
    for layer_name, layer in model.adapted_layers():
        if name in layer.lora_A:
            A, B = layer.lora_weights(name)
            tensors[f"{prefix}{layer_name}{LORA_A_KEY}weight"] = A
            tensors[f"{prefix}{layer_name}{LORA_B_KEY}weight"] = B
        if name in layer.bottleneck:
            for part in ("down", "up"):
                sub = getattr(layer.bottleneck[name], part)
                tensors[f"{prefix}{layer_name}{BOTTLENECK_KEY}{part}.weight"] = sub.weight
                tensors[f"{prefix}{layer_name}{BOTTLENECK_KEY}{part}.bias"] = sub.bias
    if name in model.heads:  # a causal-LM or embeddings adapter has none
        key = out_key(model.head_kind(name) or MEAN_POOLED, model_type(model.base))
        out = HEAD_PREFIX if key is None else f"{PEFT_PREFIX}{key}."
        tensors[out + "weight"] = model.heads[name].weight
        if model.heads[name].bias is not None:
            tensors[out + "bias"] = model.heads[name].bias
        if name in model.head_dense and not _dense_is_the_bases(model, name):
            dense = model.head_dense[name]
            tensors[f"{PEFT_PREFIX}{kind.dense_key}.weight"] = dense.weight
            tensors[f"{PEFT_PREFIX}{kind.dense_key}.bias"] = dense.bias
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}


def _backbone(model: AdapterModel) -> bool:
    """Whether the base is a Hugging Face backbone that task models hold under `base_model_prefix`."""
    return bool(getattr(model.base, "base_model_prefix", "")) and model_type(model.base) in ARCH_HEADS


def backbone_prefix(model: AdapterModel, name: str) -> str:
    """What adapter `name`'s file puts before its layer names: an architecture head's adapter is PEFT's
    SEQ_CLS/TOKEN_CLS layout, its layers under the task model's backbone attribute (`bert.`); "" otherwise."""
    kind = head_kind(model.head_kind(name) or MEAN_POOLED)
    return f"{model.base.base_model_prefix}." if kind.out_key and _backbone(model) else ""


def _dense_is_the_bases(model: AdapterModel, name: str) -> bool:
    """Whether adapter `name`'s dense layer is the base's own pooler, unchanged (then its file leaves it out,
    as PEFT's does: a task model has it from the base)."""
    if not head_kind(model.head_kinds[name]).dense_from_base:
        return False
    base_dense, dense = model.base.pooler.dense, model.head_dense[name]
    return torch.equal(base_dense.weight, dense.weight) and torch.equal(base_dense.bias, dense.bias)


def save_adapter(
    model: AdapterModel, name: str, out_dir: str | Path, base_name: str = "", extra: dict[str, Any] | None = None
) -> Path:
    """Save adapter `name` and its head to `out_dir` in PEFT's layout (atomically); `extra` joins our JSON section.

    An existing adapter directory is replaced; any other non-empty `out_dir` is refused.
    """
    if name not in model.configs:
        raise EdgeloraError(f"unknown adapter {name!r}; this model has {sorted(model.configs)}")
    check_adapter_out(out_dir)
    config = model.configs[name]
    init = getattr(config, "init", None)
    if isinstance(config, LoraConfig):
        config = plain_lora_config(config)  # PiSSA: the rank-2r LoRA of the original base
    tensors = adapter_state(model, name)
    target_modules = [layer_name for layer_name, layer in model.adapted_layers()
                      if name in layer.lora_A or name in layer.bottleneck]

    extras = {
        "format_version": FORMAT_VERSION,
        "adapter": config_to_dict(config),
        "quantization": None if model.quant is None else config_to_dict(model.quant),
        "task": model.task,
        **({"labels": model.labels[name]} if name in model.labels else {}),
        **({"head": model.head_kind(name)} if model.head_kind(name) else {}),
        "base_fingerprint": model.base_fingerprint,
        "name": name,
        **({"init": init} if init is not None else {}),
        **({RANGES_KEY: ranges_to_dict(model)} if model.quant is not None and model.quant.activations == "static" else {}),
        **(extra or {}),
    }
    kind = head_kind(model.head_kind(name) or MEAN_POOLED)
    modules_to_save = None
    if kind.out_key is not None:  # PEFT's SEQ_CLS/TOKEN_CLS names; "classifier" also matches DistilBERT's pre_classifier
        modules_to_save = ["classifier", "score"] + (["pooler"] if any(".pooler." in k for k in tensors) else [])
    if isinstance(config, LoraConfig):
        data: dict[str, Any] = {
            "peft_type": "LORA",
            "task_type": ("CAUSAL_LM" if model.task == "causal-lm" else None if not modules_to_save
                          else "TOKEN_CLS" if model.task == TOKEN_CLASSIFICATION else "SEQ_CLS"),
            "base_model_name_or_path": base_name,
            "r": config.r,
            "lora_alpha": config.alpha,
            "lora_dropout": config.dropout,
            "use_rslora": config.use_rslora,
            "target_modules": target_modules,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "modules_to_save": modules_to_save,
        }
        if config.rank_pattern:
            data["rank_pattern"] = dict(config.rank_pattern)
    else:
        data = {"peft_type": "EDGELORA_BOTTLENECK", "base_model_name_or_path": base_name, "target_modules": target_modules}
    data["edgelora"] = extras
    factors = smooth.current_factors(model) if model.quant is not None and model.quant.smoothing is not None else {}
    return write_adapter_dir(out_dir, data, tensors, factors)


def write_adapter_dir(out_dir: str | Path, data: dict[str, Any], tensors: dict[str, torch.Tensor],
                      factors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write an adapter directory from its config JSON `data`, its weights and SmoothQuant `factors`, atomically.

    The one writer of the format: `save_adapter` (from a model) and `edgelora.extract.reduce_adapter` (from
    another adapter's files) both end here. The config is written last: a directory that has it is whole.
    """

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        smooth.save_factors(factors or {}, tmp)  # the SmoothQuant factors the adapter was trained against
        (tmp / CONFIG_FILE).write_text(json.dumps(data, indent=2) + "\n")

    write_dir_atomic(Path(out_dir), fill)
    return Path(out_dir)


def read_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and check an adapter directory: (config JSON, tensors), with one-line errors naming the file."""
    path = Path(path)
    if not path.exists():
        raise EdgeloraError(f"{path}: adapter directory does not exist{interrupted_write_note(path)}")
    if not path.is_dir():
        raise EdgeloraError(f"{path}: expected an adapter directory holding {CONFIG_FILE} and {WEIGHTS_FILE}")
    cfg_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_path.is_file():
        raise EdgeloraError(f"{path}: not an adapter directory (no {CONFIG_FILE}); train one with `edgelora train`")
    try:
        data = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EdgeloraError(f"{cfg_path}: corrupt JSON ({exc}); re-save the adapter") from exc
    if not isinstance(data, dict):
        raise EdgeloraError(f"{cfg_path}: expected a JSON object")
    if not weights_path.is_file():
        legacy = path / "adapter_model.bin"
        hint = " (adapter_model.bin found: re-save it with safetensors)" if legacy.exists() else ""
        raise EdgeloraError(f"{path}: missing {WEIGHTS_FILE}{hint}")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise EdgeloraError(f"{weights_path}: corrupt or truncated safetensors file ({exc})") from exc
    extras = data.get("edgelora") or {}
    if extras.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise EdgeloraError(f"{cfg_path}: written by a newer edgelora (format {extras['format_version']}); upgrade edgelora")
    return data, tensors


def adapter_config(data: dict[str, Any], source: str) -> LoraConfig | BottleneckConfig:
    """The adapter's config, from our extras when present, else from PEFT's own LoRA fields."""
    extras = data.get("edgelora")
    if extras and "adapter" in extras:
        return adapter_config_from_dict(extras["adapter"], source)
    if data.get("peft_type") != "LORA":
        raise EdgeloraError(f"{source}: peft_type {data.get('peft_type')!r} is not supported; only LoRA adapters load from PEFT")
    # Variants whose weights would load but compute something else than plain LoRA: refuse, never guess.
    variants = {"use_dora": "DoRA", "lora_bias": "LoRA bias", "alpha_pattern": "per-layer alpha (alpha_pattern)"}
    found = [what for key, what in variants.items() if data.get(key)]
    if found:
        raise EdgeloraError(f"{source}: {', '.join(found)} is not supported; give a plain LoRA adapter (one r and alpha)")
    return LoraConfig(
        r=int(data["r"]),
        alpha=float(data.get("lora_alpha", data["r"])),
        dropout=float(data.get("lora_dropout", 0.0)),
        use_rslora=bool(data.get("use_rslora", False)),
        target_modules=None,
        rank_pattern=data.get("rank_pattern") or None,
    )


def load_adapter(model: AdapterModel, path: str | Path, name: str | None = None, *, check_base: bool = True) -> str:
    """Add the adapter saved at `path` (ours or PEFT's LoRA) to `model`; returns its name.

    The base fingerprint is checked, and every weight must land on a layer of the right shape. The head is
    the one the file carries (`_read_head`): ours, PEFT's SEQ_CLS head, or none (FEATURE_EXTRACTION).
    """
    path = Path(path)
    data, tensors = read_adapter(path)
    source = str(path / CONFIG_FILE)
    extras = data.get("edgelora") or {}
    config = adapter_config(data, source)
    name = name or extras.get("name") or path.name
    fp = extras.get("base_fingerprint")
    if check_base and fp and fp != model.base_fingerprint:
        raise EdgeloraError(
            f"{path}: adapter was trained on another base (fingerprint {fp[:12]}…, this base {model.base_fingerprint[:12]}…); "
            "export it with the base it was trained on"
        )
    task_type = data.get("task_type")
    task = extras.get("task") or _PEFT_TASKS.get(task_type) or (
        "classification" if f"{HEAD_PREFIX}weight" in tensors else model.task)
    if task != model.task:  # a stock PEFT adapter (no extras, no task type) loads into either
        raise EdgeloraError(f"{path}: a {task} adapter cannot load into a {model.task} model; "
                            + ("load the base with CausalLMAdapterModel" if task == "causal-lm" else
                               "load it with AdapterModel (an encoder task)"))
    head, labels, head_state = None, [], {}
    if model.task != "causal-lm":
        head, labels, head_state = _read_head(model, data, tensors, path, name)
    else:  # the base's own LM head predicts: a saved lm_head or other module would be left out
        _refuse_unplaced(path / WEIGHTS_FILE, [k for k in tensors if not any(m in k for m in ADAPTER_KEYS)])
    tensors = {k: v for k, v in tensors.items() if any(m in k for m in ADAPTER_KEYS)}
    quant = extras.get("quantization")
    layer_names = sorted(
        {k[len(PEFT_PREFIX):].split(LORA_A_KEY)[0] for k in tensors if LORA_A_KEY in k}
        | {k[len(PEFT_PREFIX):].split(BOTTLENECK_KEY)[0] for k in tensors if BOTTLENECK_KEY in k}
    )
    if not layer_names:
        raise EdgeloraError(f"{path / WEIGHTS_FILE}: holds no LoRA or bottleneck weights")
    known = set(model.quantizable_names())
    resolved = {n: _resolve_layer(n, known) for n in layer_names}
    missing = [n for n, r in resolved.items() if r is None]
    if missing:
        raise EdgeloraError(f"{path}: adapter targets layers this base does not have ({', '.join(missing[:3])}); wrong base?")
    if isinstance(config, LoraConfig):  # saved weights, never re-initialised: init "default"
        config = dataclasses.replace(config, target_modules=tuple(sorted(resolved.values())), include_mlp=False,
                                     init="default")
    recipe = QuantConfig(**quant) if quant else model.quant
    _check_same_recipe(model, recipe, path)
    model.add_adapter(name, config, labels, quant=recipe, **({"head": head} if head else {}))  # causal LMs: none
    state = {**_module_state(name, tensors, resolved), **head_state}
    own = {k: v for k, v in model.state_dict().items() if k in state}
    for key, value in state.items():
        if key not in own:
            model.delete_adapter(name)
            raise EdgeloraError(f"{path}: weight {key} has no place in this model; the adapter is for another base")
        if tuple(own[key].shape) != tuple(value.shape):
            model.delete_adapter(name)
            raise EdgeloraError(
                f"{path}: {key} has shape {tuple(value.shape)} but this base needs {tuple(own[key].shape)}; "
                "the adapter is for another base or rank"
            )
    model.load_state_dict(state, strict=False)
    try:
        _load_smoothing(model, path, quant)
    except EdgeloraError:
        model.delete_adapter(name)
        raise
    if model.quant is not None and model.quant.activations == "static" and quant:
        try:  # the recipe's calibrated ranges follow the adapter they were calibrated (and trained) with
            load_ranges(model, extras.get(RANGES_KEY), source)
        except EdgeloraError:
            model.delete_adapter(name)
            raise
    return name


# PEFT task types -> the model task that loads them; the ones not listed are refused by `_read_head`.
_PEFT_TASKS = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "classification", "FEATURE_EXTRACTION": "classification",
               "TOKEN_CLS": TOKEN_CLASSIFICATION}


def _read_head(model: AdapterModel, data: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path,
               name: str) -> tuple[str | None, list[str], dict[str, torch.Tensor]]:
    """The head an adapter file carries: (kind or None for no head, labels, the head's state under this
    model's keys). Ours (`edgelora_head.*`, mean-pooled), PEFT's SEQ_CLS head (`modules_to_save`), applied
    as the architecture's ...ForSequenceClassification applies it, or a TOKEN_CLS `classifier` over every
    token; FEATURE_EXTRACTION and adapters of no task type have none. Refuses, in one line saying why, whatever it cannot apply exactly: never a stand-in."""
    extras = data.get("edgelora") or {}
    task_type = data.get("task_type")
    weights = path / WEIGHTS_FILE
    extra_keys = [k for k in tensors if not any(m in k for m in ADAPTER_KEYS)]
    if f"{HEAD_PREFIX}weight" in tensors:
        n_labels = tensors[f"{HEAD_PREFIX}weight"].shape[0]
        labels = list(extras.get("labels") or [str(i) for i in range(n_labels)])
        state = {f"heads.{name}.{k[len(HEAD_PREFIX):]}": v for k, v in tensors.items() if k.startswith(HEAD_PREFIX)}
        _refuse_unplaced(weights, [k for k in extra_keys if not k.startswith(HEAD_PREFIX)])
        return (PER_TOKEN if model.task == TOKEN_CLASSIFICATION else MEAN_POOLED), labels, state
    kind_name = extras.get("head") or (PER_TOKEN if task_type == "TOKEN_CLS" else None)
    if kind_name is None and task_type == "SEQ_CLS":
        arch = model_type(model.base)
        kind_name = ARCH_HEADS.get(arch or "")
        if kind_name is None:
            raise EdgeloraError(f"{path}: a SEQ_CLS adapter for a {arch or type(model.base).__name__} base: edgelora "
                                f"knows the sequence-classification heads of {', '.join(sorted(ARCH_HEADS))} only")
    if kind_name is None:
        if task_type not in (None, "FEATURE_EXTRACTION"):
            raise EdgeloraError(f"{path / CONFIG_FILE}: task_type {task_type!r} is not supported; edgelora exports "
                                "SEQ_CLS, TOKEN_CLS, FEATURE_EXTRACTION and CAUSAL_LM adapters")
        _refuse_unplaced(weights, extra_keys)  # an embeddings adapter: nothing but its layers
        return None, [], {}
    if kind_name not in HEAD_KINDS or HEAD_KINDS[kind_name].out_key is None:
        raise EdgeloraError(f"{path / CONFIG_FILE}: head {kind_name!r} is not one of {', '.join(HEAD_KINDS)}; re-save the adapter")
    kind = HEAD_KINDS[kind_name]
    classifier = out_key(kind_name, model_type(model.base))
    width = hidden_size(model.base)
    out_w = tensors.get(f"{PEFT_PREFIX}{classifier}.weight")
    if out_w is None:
        raise EdgeloraError(f"{weights}: a {task_type or 'SEQ_CLS'} adapter without its classifier "
                            f"({PEFT_PREFIX}{classifier}.weight, "
                            "saved by PEFT under modules_to_save); re-save it with PEFT's save_pretrained")
    if out_w.ndim != 2 or out_w.shape[1] != width:
        raise EdgeloraError(f"{weights}: {classifier}.weight has shape {tuple(out_w.shape)}, this base needs "
                            f"(labels, {width}); the adapter is for another base")
    if out_w.shape[0] < 2:
        raise EdgeloraError(f"{weights}: {classifier} has {out_w.shape[0]} output (a regression head); edgelora "
                            "exports classifiers of at least 2 labels")
    used = {f"{PEFT_PREFIX}{classifier}.weight"}
    state = {f"heads.{name}.weight": out_w}
    out_b = tensors.get(f"{PEFT_PREFIX}{classifier}.bias")
    if (out_b is not None) != kind.bias:
        raise EdgeloraError(f"{weights}: {classifier} {'has' if out_b is not None else 'lacks'} a bias, which the "
                            f"{kind_name} head {'does not have' if out_b is not None else 'needs'}; wrong base?")
    if out_b is not None:
        state[f"heads.{name}.bias"] = out_b
        used.add(f"{PEFT_PREFIX}{classifier}.bias")
    if kind.dense_key is not None:
        dense = {p: tensors.get(f"{PEFT_PREFIX}{kind.dense_key}.{p}") for p in ("weight", "bias")}
        if any(v is None for v in dense.values()):
            dense = _dense_from_base(model, kind_name, path)
        else:
            used |= {f"{PEFT_PREFIX}{kind.dense_key}.{p}" for p in ("weight", "bias")}
        if tuple(dense["weight"].shape) != (width, width):
            raise EdgeloraError(f"{weights}: {kind.dense_key}.weight has shape {tuple(dense['weight'].shape)}, this "
                                f"base needs ({width}, {width}); the adapter is for another base")
        state.update({f"head_dense.{name}.{p}": v for p, v in dense.items()})
    _refuse_unplaced(weights, [k for k in extra_keys if k not in used])
    n = out_w.shape[0]
    labels = list(extras.get("labels") or _config_labels(model, n))
    return kind_name, labels, state


def _config_labels(model: AdapterModel, n: int) -> list[str]:
    """The base config's label names for an `n`-class PEFT head (`config_labels`)."""
    return config_labels(getattr(getattr(model.base, "config", None), "id2label", None), n)


def config_labels(id2label: Mapping[Any, Any] | None, n: int) -> list[str]:
    """Label names from a base config's id2label when it names `n` classes, else transformers' defaults
    (LABEL_0, ...): what the task model the adapter was trained on called them."""
    names = {int(k): str(v) for k, v in (id2label or {}).items()}
    if sorted(names) == list(range(n)):
        return [names[i] for i in range(n)]
    return [f"LABEL_{i}" for i in range(n)]


# The dense layer a task model may take from its base checkpoint, by head kind: (the checkpoint key's end,
# the module to add to modules_to_save so that PEFT saves it with the adapter).
_BASE_DENSE = {"bert-pooler": ("pooler.dense", "pooler"), "distilbert": ("pre_classifier", "pre_classifier")}


def _dense_from_base(model: AdapterModel, kind_name: str, path: Path) -> dict[str, torch.Tensor]:
    """The dense layer a SEQ_CLS adapter did not save, as its task model got it from the base checkpoint;
    refused when the checkpoint lacks it (transformers would have initialised it at random, so PEFT's
    own outputs cannot be reproduced)."""
    kind = HEAD_KINDS[kind_name]
    why = f"the adapter does not hold {kind.dense_key} (modules_to_save)"
    if kind_name not in _BASE_DENSE:
        raise EdgeloraError(f"{path}: {why}; re-save it with PEFT's save_pretrained")
    suffix, module_name = _BASE_DENSE[kind_name]
    fix = f"retrain with modules_to_save=['classifier', '{module_name}']"
    where = getattr(model.base, "name_or_path", "") or ""
    checkpoint = Path(where) if where and Path(where).is_dir() else None
    if checkpoint is not None:
        from safetensors import safe_open

        for file in sorted(checkpoint.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                found = {p: next((f.get_tensor(k) for k in f.keys() if k.endswith(f"{suffix}.{p}")), None)
                         for p in ("weight", "bias")}
            if all(v is not None for v in found.values()):
                return found
        raise EdgeloraError(f"{path}: {why} and the base checkpoint {checkpoint} has none, so transformers gives "
                            f"the task model a random one and PEFT's outputs cannot be reproduced; {fix}")
    module = getattr(getattr(model.base, "pooler", None), "dense", None) if kind.dense_from_base else None
    if module is None:
        raise EdgeloraError(f"{path}: {why} and the base has none, so PEFT's outputs cannot be reproduced; {fix}")
    return {"weight": module.weight.detach().clone(), "bias": module.bias.detach().clone()}


def _refuse_unplaced(weights: Path, keys: list[str]) -> None:
    """Refuse tensors that are neither adapter layers nor a head edgelora applies (e.g. other
    `modules_to_save`): exporting without them would not give the adapter's outputs."""
    if keys:
        raise EdgeloraError(f"{weights}: holds {keys[0]}" + (f" and {len(keys) - 1} more" if len(keys) > 1 else "")
                            + ", which is neither LoRA nor a classification head edgelora applies; "
                            "export an adapter without extra modules_to_save")


def adapter_task(path: str | Path) -> str:
    """The task an adapter directory was trained for: ours say it, PEFT's say it by `task_type`."""
    data, tensors = read_adapter(path)
    extras = data.get("edgelora") or {}
    return extras.get("task") or _PEFT_TASKS.get(data.get("task_type")) or "classification"


def _resolve_layer(name: str, known: set[str]) -> str | None:
    """PEFT keys of a task model carry the backbone's attribute (`bert.encoder...`, `model.layers...`);
    ours start at the backbone. Drop leading segments until the name is a layer of this base."""
    parts = name.split(".")
    for i in range(min(3, len(parts))):
        candidate = ".".join(parts[i:])
        if candidate in known:
            return candidate
    return None


def _module_state(name: str, tensors: dict[str, torch.Tensor], resolved: dict[str, str]) -> dict[str, torch.Tensor]:
    """Map file keys to this model's state-dict keys for adapter `name`."""
    state: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key.startswith(HEAD_PREFIX):
            state[f"heads.{name}.{key[len(HEAD_PREFIX):]}"] = value
            continue
        inner = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for marker in ADAPTER_KEYS:
            if marker in inner:
                layer, _, rest = inner.partition(marker)
                rest = rest.split(".")[-1] if marker != BOTTLENECK_KEY else rest  # PEFT may keep ".default."
                state[f"base.{resolved[layer]}{marker}{name}.{rest}"] = value
    return state


# Recipe fields every adapter of one model (hence one bundle) must share: the graph has one base.
SHARED_RECIPE_FIELDS = ("weight_bits", "activations", "mode", "skip_layers", "smoothing", "weight_block", "block_layers")


def _check_same_recipe(model: AdapterModel, recipe: QuantConfig | None, path: Path) -> None:
    """Refuse an adapter whose int8 recipe differs from the one the model's other adapters were trained with."""
    held = model.quant
    if not model.configs or held is None or recipe is None:
        return
    for field in SHARED_RECIPE_FIELDS:
        mine, theirs = getattr(recipe, field), getattr(held, field)
        if mine != theirs:
            raise EdgeloraError(f"{path}: trained with {field}={mine!r} but the adapters already loaded use {theirs!r}; "
                                "adapters exported together must share one int8 recipe: retrain it, or export apart")


def _load_smoothing(model: AdapterModel, path: Path, quant: dict | None) -> None:
    """Apply the SmoothQuant factors saved beside an adapter; adapters sharing a model must share them."""
    factors = smooth.load_factors(path)
    if bool(factors) != bool(quant and quant.get("smoothing") is not None):
        raise EdgeloraError(f"{path}: its config and {smooth.SMOOTHING_FILE} disagree on smoothing; re-save the adapter")
    held = smooth.current_factors(model)
    if not factors:
        from edgelora.causal_lm import CausalLMAdapterModel

        if held and quant is None and isinstance(model, CausalLMAdapterModel):
            return  # trained fp32: a decoder's LoRA branch reads the unsmoothed input, so it joins in either order
        if held:
            raise EdgeloraError(f"{path}: adapter was trained without smoothing but the model's other adapters use "
                                "SmoothQuant factors; export them separately or retrain with QuantConfig.smoothing")
        return
    if held:
        same = set(held) == set(factors) and all(torch.equal(held[k].cpu(), factors[k]) for k in factors)
        if not same:
            raise EdgeloraError(f"{path / smooth.SMOOTHING_FILE}: other SmoothQuant factors than the model's other "
                                "adapters; adapters in one bundle must be trained with the same factors")
        return
    try:
        smooth.apply_smoothing(model, factors)
    except EdgeloraError as e:  # factors for other layers or shapes: name the file they came from
        raise EdgeloraError(f"{path / smooth.SMOOTHING_FILE}: {e}") from None
