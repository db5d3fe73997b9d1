"""A Hugging Face causal LM as one ONNX graph with a KV cache, built directly from its weights.

The graph takes the new tokens and the cache and returns logits and the longer cache (Optimum's
decoder-with-past names), so prefill (past length 0) and each decode step run the same graph; prompts in
a batch are left-padded. Every linear is a MatMul (fp32) or a MatMulNBits node (int8: blocks of 32 along
the input, int8 compute with activations quantized per row and block — a row's result never depends on
its batch-mates), and the default attention core sums over keys in float64, so left padding cannot
change a row either: a request's logits are bit-identical alone and batched. Llama-style models (Llama,
Mistral, Qwen2: grouped-query attention, RMSNorm, rotary, SwiGLU, with or without q/k/v biases) and GPT-2
(LayerNorm, learned positions, GELU, Conv1D weights) are supported; other model types are refused.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from edgelora.config import QuantConfig, is_block_layer
from edgelora.errors import EdgeloraError
from edgelora.fake_quant import BLOCK, ROW_QMAX, ROW_TINY, quantize_weight, quantize_weight_blockwise
from edgelora.runtime.bundle import ADAPTER_IDS, LOGITS_TO_KEEP  # adapter_ids: int64 [rows], each row's bank entry

OPSET = 23  # RMSNormalization and Attention
IR_VERSION = 11
LLAMA_STYLE = ("llama", "mistral", "qwen2")
# "invariant": MatMul / Softmax / MatMul with the softmax and probs @ v in float64 (the default); "ops": the
# same in float32; "onnx": ONNX's Attention node; "gqa": ONNX Runtime's GroupQueryAttention (com.microsoft),
# one node a layer taking the packed q|k|v, rotary (at cache indices, see _gqa), cache concat and attention
# together (the fastest). (SkipSimplifiedLayerNormalization for the residual Add + RMSNorm was tried twice and
# reverted twice: no speed measurable on the AVX2 VM, and it rounds the norm differently.)
# Left padding moves a row's keys to other indices of the key axis, so float32 reductions over it
# (softmax's sum, probs @ v) round differently alone and in a batch; in float64 those differences stay far
# below float32's last bit and the row is bit-identical. Only "invariant" keeps a row's logits bit-identical
# alone and in a left-padded batch; the others are exact to float32 rounding (and identical at batch 1).
ATTENTION_CORES = ("invariant", "ops", "onnx", "gqa")
OPTIONAL_INPUTS = (LOGITS_TO_KEEP,)
GQA_POSITIONS = "gqa.positions"  # "gqa" with rotate_half tables: the rotary positions GroupQueryAttention takes
MASKED = float(np.finfo(np.float32).min)  # what transformers adds to masked scores: finite, so no NaN ever


@dataclass(frozen=True)
class DecoderSpec:
    """What the graph and the runtime need to know about a decoder's shape."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    norm_eps: float
    attention_scale: float
    activation: str = "silu"  # the MLP's: SwiGLU with silu (Llama-style), or GPT-2's gelu / gelu_new


@dataclass(frozen=True)
class QuantizedMatMul:
    """One int8 matmul of the graph: its float input and output tensors and the float weight it quantized.

    kind "block": MatMulNBits; "rowwise": per-row activations and per-channel `bits`-bit weights through
    MatMulIntegerToFloat, `input` then being the smoothed input and `weight` the smoothed W diag(s)."""

    input: str
    output: str
    weight: np.ndarray  # (out, in) float32, before quantization
    kind: str = "block"
    bits: int = 8


@dataclass(frozen=True)
class RowwisePlan:
    """How the rowwise int8 scheme quantizes each linear of one graph, by the model's own module names."""

    quant: QuantConfig  # activations "per-row": the recipe training fake-quantized with
    smoothing: Mapping[str, torch.Tensor] = field(default_factory=dict)  # module name -> (in,) SmoothQuant s
    # grids as uint8 at zero point 128 (MLAS's u8 x u8 kernel, which never saturates): decoder_int8.rowwise_plan
    # sets it for 8-bit weights on CPUs whose u8 x s8 kernel saturates them (AVX2 without VNNI); int8 keeps
    # u8 x s8, VNNI's fast path
    unsigned_weights: bool = False


@dataclass
class DecoderGraph:
    model: onnx.ModelProto
    spec: DecoderSpec
    quantized: dict[str, QuantizedMatMul] = field(default_factory=dict)
    slots: tuple[str, ...] = ()  # the adapter bank inputs (switchable graphs), `<module>.lora_A|lora_B`

    @property
    def input_names(self) -> list[str]:
        """The inputs a run must feed (the decoder contract's), in order: not those with a default (an
        initializer of the same name: `logits_to_keep`, the adapter banks, `adapter_ids`)."""
        inits = {t.name for t in self.model.graph.initializer}
        return [i.name for i in self.model.graph.input if i.name not in inits]

    @property
    def positions(self) -> str:
        """"cache_index" where GroupQueryAttention rotates at each token's cache index (GQA_POSITIONS), else
        "position_ids"."""
        return "cache_index" if any(GQA_POSITIONS in n.output for n in self.model.graph.node) else "position_ids"

    @property
    def optional_inputs(self) -> list[str]:
        """The run options a caller may feed (`logits_to_keep`); adapter inputs are listed apart."""
        names = {i.name for i in self.model.graph.input}
        return [n for n in OPTIONAL_INPUTS if n in names]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.model.graph.output]


GPT2_ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}  # ONNX Gelu's `approximate`


def decoder_spec(model: torch.nn.Module) -> DecoderSpec:
    """The spec of a loaded causal LM, or a one-line refusal for a model type the graph cannot express."""
    config = model.config
    kind = getattr(config, "model_type", None) or type(model).__name__
    if kind == "gpt2":
        act = config.activation_function
        odd = [f for f in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention")
               if getattr(config, f, False)]
        if act not in GPT2_ACTIVATIONS or odd:
            raise EdgeloraError(f"decoder export supports plain GPT-2; this one has "
                                f"{', '.join(odd) or f'activation_function {act!r}'}")
        head_dim = config.n_embd // config.n_head
        return DecoderSpec(kind, config.n_layer, config.n_embd, config.n_head, config.n_head, head_dim,
                           config.vocab_size, int(config.n_positions), float(config.layer_norm_epsilon),
                           head_dim ** -0.5 if config.scale_attn_weights else 1.0, act)
    if kind not in LLAMA_STYLE:
        raise EdgeloraError(f"decoder export supports model types {', '.join(LLAMA_STYLE)}, gpt2; "
                            f"this base is {kind!r}")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise EdgeloraError(f"decoder export supports the SwiGLU MLP (hidden_act 'silu'); this base uses {act!r}")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    context = int(config.max_position_embeddings)
    window = getattr(config, "sliding_window", None)
    if window and (kind == "mistral" or getattr(config, "use_sliding_window", False)):
        context = min(context, int(window))  # within the window, sliding attention is full attention
    return DecoderSpec(kind, config.num_hidden_layers, config.hidden_size, heads,
                       getattr(config, "num_key_value_heads", None) or heads, head_dim, config.vocab_size,
                       context, float(config.rms_norm_eps), float(model.model.layers[0].self_attn.scaling))


def input_names(num_layers: int) -> list[str]:
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past]


def output_names(num_layers: int) -> list[str]:
    return ["logits", *[f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]]


def rotary_tables(model: torch.nn.Module, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) (length, head_dim) from the model's own rotary module, so every RoPE variant it knows
    (default, llama3, linear, ...) gives the very values it computes at those positions."""
    rotary = model.model.rotary_emb
    positions = torch.arange(length, dtype=torch.int64)[None]
    probe = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(probe, positions)
    return cos[0].numpy().astype(np.float32), sin[0].numpy().astype(np.float32)


class Rotary(NamedTuple):
    """The (positions, head_dim / 2) cos and sin tables of ONNX's RotaryEmbedding (one node per q and k)."""

    cos: str
    sin: str


class _Builder:
    """Nodes and initializers with unique names; `op` returns the (first) output's name."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._count = 0

    def op(self, op_type: str, inputs: list[str], name: str, outputs: int = 1, domain: str = "", **attrs) -> str:
        outs = [name] if outputs == 1 else [f"{name}.{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"{name}/{op_type}", domain=domain, **attrs))
        return outs[0]

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array).reshape(np.shape(array)), name))
        return name

    def ints(self, name: str, values: list[int]) -> str:
        return self.init(name, np.asarray(values, dtype=np.int64))

    def scalar(self, name: str, value: float) -> str:
        return self.init(name, np.asarray(value, dtype=np.float32))


def _linear(b: _Builder, x: str, name: str, weight: torch.Tensor, bias: torch.Tensor | None, precision: str,
            quantized: dict[str, QuantizedMatMul], rowwise: tuple[int, torch.Tensor | None, bool] | None = None) -> str:
    """x @ weight.T (+ bias): MatMul on the transposed fp32 weight, MatMulNBits on blockwise int8, or with
    `rowwise` (weight bits, SmoothQuant s or None, unsigned grid) the rowwise scheme's per-row int8
    (`_rowwise_matmul`)."""
    w = weight.detach().to(torch.float32)
    n, k = w.shape
    if precision == "int8" and rowwise is not None:
        bits, smooth, unsigned = rowwise
        y = _rowwise_matmul(b, x, name, w, bits, smooth, quantized, unsigned)
    elif precision == "fp32":
        y = b.op("MatMul", [x, b.init(f"{name}.weight_t", w.T.contiguous().numpy())], f"{name}.matmul")
    else:
        q, scale = quantize_weight_blockwise(w, BLOCK)
        blocks = scale.shape[1]
        padded = torch.zeros(n, blocks * BLOCK, dtype=torch.int32)
        padded[:, :k] = q.to(torch.int32)
        data = (padded + 128).to(torch.uint8).reshape(n, blocks, BLOCK)  # MatMulNBits' 8-bit zero point is 128
        y = b.op("MatMulNBits", [x, b.init(f"{name}.qweight", data.numpy()),
                                 b.init(f"{name}.scales", scale.reshape(-1).numpy())],
                 f"{name}.matmul", domain="com.microsoft", K=k, N=n, bits=8, block_size=BLOCK, accuracy_level=4)
        quantized[name] = QuantizedMatMul(x, y, w.numpy())
    if bias is not None:
        y = b.op("Add", [y, b.init(f"{name}.bias", bias.detach().to(torch.float32).numpy())], f"{name}.out")
    return y


def _row_constants(b: _Builder) -> None:
    """The rowwise quantizer's shared constants, once per graph."""
    if any(t.name == "rowq.tiny" for t in b.inits):
        return
    b.scalar("rowq.tiny", ROW_TINY)
    b.scalar("rowq.qmax", ROW_QMAX)
    b.scalar("rowq.one", 1.0)
    b.init("rowq.zero_point", np.asarray(128, np.uint8))
    b.ints("rowq.last", [-1])


def _row_quantized(b: _Builder, x: str, k: int) -> tuple[str, str]:
    """(uint8 q + 128, float32 row scale (..., 1)) of x (..., k), symmetric per row by the row's own max: the
    nodes that `edgelora.fake_quant.quantize_activation_rowwise` mirrors. One set per distinct input (q|k|v and
    gate|up read one tensor each), reused by every matmul that reads it.

    The divide, round half to even, + 128 and cast are one blocked QuantizeLinear (a block is a whole row), whose
    zero point must have the scales' shape: a (..., 1) tensor of 128s made from this input's own row maxima (the
    LM head's input, cut by logits_to_keep, has other leading dims than the layers')."""
    q, scale = f"{x}.rowq", f"{x}.rowq.scale"
    if any(n.output[0] == q for n in b.nodes):
        return q, scale
    _row_constants(b)
    amax = b.op("ReduceMax", [b.op("Abs", [x], f"{x}.rowq.abs"), "rowq.last"], f"{x}.rowq.amax", keepdims=1)
    amax = b.op("Max", [amax, "rowq.tiny"], f"{x}.rowq.amax_safe")
    b.op("Div", [amax, "rowq.qmax"], scale)
    zero_points = b.op("Expand", ["rowq.zero_point", b.op("Shape", [amax], f"{x}.rowq.rows")], f"{x}.rowq.zero_points")
    b.op("QuantizeLinear", [x, scale, zero_points], q, axis=-1, block_size=k)
    return q, scale


def _rowwise_matmul(b: _Builder, x: str, name: str, w: torch.Tensor, bits: int, smooth: torch.Tensor | None,
                    quantized: dict[str, QuantizedMatMul], unsigned: bool = False) -> str:
    """x @ w.T by the rowwise scheme: x times 1/s (SmoothQuant, when given), quantized per row, times the int8
    grid of w diag(s) per output channel in MatMulIntegerToFloat (a_scale 1, a_zero_point 128, b_scale per
    column), times the row scales. Weights are written (in, out), as the kernel takes them."""
    if smooth is not None:
        inv = (1.0 / smooth.detach().to(torch.float32)).to(torch.float32)  # what AdaptedLinear multiplies by
        x = b.op("Mul", [x, b.init(f"{name}.smooth_inv", inv.numpy())], f"{name}.smoothed")
        w = w * smooth.detach().to(torch.float32)
    q_x, row_scale = _row_quantized(b, x, w.shape[1])
    q_w, w_scale = quantize_weight(w, bits)
    grid = q_w.T.contiguous().numpy()
    zero_point: list[str] = []
    if unsigned:  # uint8 q + 128 at zero point 128: the same grid through MLAS's u8 x u8 kernel, which never
        # saturates (u8 x s8 does at 8 bits on CPUs without VNNI), exact wherever ONNX Runtime >= 1.25 runs it
        grid, zero_point = (grid.astype(np.int16) + 128).astype(np.uint8), ["rowq.zero_point"]
    unscaled = b.op("MatMulIntegerToFloat", [q_x, b.init(f"{name}.qweight_t", grid), "rowq.one",
                                             b.init(f"{name}.scales", w_scale.numpy()), "rowq.zero_point",
                                             *zero_point], f"{name}.matmul_int", domain="com.microsoft")
    y = b.op("Mul", [unscaled, row_scale], f"{name}.matmul")
    quantized[name] = QuantizedMatMul(x, y, w.numpy(), "rowwise", bits)
    return y


def _rowwise_choice(plan: RowwisePlan | None, name: str,
                    modules: list[str]) -> tuple[int, torch.Tensor | None, bool] | None:
    """The rowwise scheme's (bits, s or None, unsigned grid) for graph linear `name` over the model's `modules`, or None for
    a linear it keeps blockwise; members of one packed matmul must agree, as training gave them one input."""
    if plan is None:
        return None
    blockwise = {is_block_layer(plan.quant, m) for m in modules}
    if len(blockwise) > 1:
        raise EdgeloraError(f"block_layers={list(plan.quant.block_layers)} splits the packed projection {name} "
                            f"({', '.join(modules)}); name all of them or none")
    if blockwise.pop():
        return None
    factors = [plan.smoothing.get(m) for m in modules]
    if any(f is None for f in factors) != all(f is None for f in factors) or any(
            f is not None and not torch.equal(f, factors[0]) for f in factors):
        raise EdgeloraError(f"SmoothQuant factors differ within the packed projection {name} ({', '.join(modules)}); "
                            "layers reading one tensor must share them: recompute them with edgelora.smooth")
    return plan.quant.weight_bits, factors[0], plan.unsigned_weights


ADAPTER_ROWS = "adapter_ids.rows"  # adapter_ids expanded to the batch: one bank entry per row, always


def _adapter_rows(b: _Builder) -> str:
    """`adapter_ids` ([1] or [batch]) expanded to [batch], once per graph. Every row then gathers its own entry
    and the LoRA matmuls run per row, (S, in) @ (in, r), whether the batch mixes adapters or not: ONNX
    Runtime computes a (1, in) row by another kernel than a row of a taller matrix, so a broadcast
    (B*S, in) @ (in, r) would give a decoding row other last bits in a batch than alone."""
    if not any(n.output[0] == ADAPTER_ROWS for n in b.nodes):
        batch = b.op("Shape", ["input_ids"], "adapter_batch", start=0, end=1)
        b.op("Expand", [ADAPTER_IDS, batch], ADAPTER_ROWS)
    return ADAPTER_ROWS


def _lora_slot(b: _Builder, x: str, module: str, n_in: int, n_out: int, banks: list[onnx.ValueInfoProto]) -> str:
    """x @ A[ids] @ B[ids] for one projection's adapter bank (see exporters/switchable.py): the bank inputs
    `model.base.<module>.lora_A` (adapters, in, rank) and `.lora_B` (adapters, rank, out, the LoRA scaling
    folded in), each defaulting to one zero-rank entry, so with nothing fed the branch adds exact zeros."""
    ids = _adapter_rows(b)
    slot = f"model.base.{module}"
    rank = f"{slot}.lora_rank"
    out = x
    for role, default, dims in (("lora_A", (1, n_in, 0), ["adapters", n_in, rank]),
                                ("lora_B", (1, 0, n_out), ["adapters", rank, n_out])):
        name = b.init(f"{slot}.{role}", np.zeros(default, np.float32))
        banks.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
        rows = b.op("Gather", [name, ids], f"{name}.rows", axis=0)  # (B, in, r) / (B, r, out)
        out = b.op("MatMul", [out, rows], f"{slot}.{role}.matmul")  # (B, S, r), then (B, S, out)
    return out


def _with_lora(b: _Builder, y: str, x: str, name: str, modules: list[tuple[str, int]], n_in: int,
               banks: list[onnx.ValueInfoProto]) -> str:
    """The packed projection's output `y` plus each member's LoRA branch, concatenated in packing order (q|k|v,
    gate|up), so the base stays one matmul and every projection keeps its own adapter slot."""
    deltas = [_lora_slot(b, x, module, n_in, n_out, banks) for module, n_out in modules]
    delta = deltas[0] if len(deltas) == 1 else b.op("Concat", deltas, f"{name}.lora", axis=-1)
    return b.op("Add", [y, delta], f"{name}.adapted")


def projection_modules(model: torch.nn.Module, spec: DecoderSpec, name: str) -> list[tuple[str, int]]:
    """The model's own module names (and output widths) behind one linear of the graph, in packing order:
    `layers.3.qkv` of a Llama is model.layers.3.self_attn.q_proj, k_proj, v_proj. The LM head: none (no slot)."""
    parts = name.split(".")
    if parts[0] != "layers":
        return []
    i, kind = parts[1], parts[2]
    if spec.model_type == "gpt2":
        path = {"qkv": "attn.c_attn", "o_proj": "attn.c_proj", "c_fc": "mlp.c_fc", "down_proj": "mlp.c_proj"}[kind]
        names = [f"transformer.h.{i}.{path}"]
    else:
        names = {"qkv": [f"self_attn.{p}_proj" for p in "qkv"], "o_proj": ["self_attn.o_proj"],
                 "gate_up": ["mlp.gate_proj", "mlp.up_proj"], "down_proj": ["mlp.down_proj"]}[kind]
        names = [f"model.layers.{i}.{n}" for n in names]
    modules = dict(model.named_modules())
    out = []
    for n in names:
        m = modules[n]
        out.append((n, int(m.weight.shape[1] if type(m).__name__ == "Conv1D" else m.weight.shape[0])))
    return out


def _packed(modules: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One (sum of outs, in) weight for linears sharing an input (q|k|v, gate|up), and their biases if any."""
    weight = torch.cat([m.weight for m in modules])
    if all(m.bias is None for m in modules):
        return weight, None
    return weight, torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features) for m in modules])


def _rope(b: _Builder, x: str, cos: str, sin: str, half: int, name: str) -> str:
    """x * cos + rotate_half(x) * sin on (..., head_dim), rotate_half(x) = [-x2, x1] as transformers does."""
    x1, x2 = (f"{name}.half.0", f"{name}.half.1")
    b.op("Split", [x, b.ints(f"{name}.halves", [half, half])], f"{name}.half", outputs=2, axis=-1)
    rotated = b.op("Concat", [b.op("Neg", [x2], f"{name}.neg"), x1], f"{name}.rot", axis=-1)
    return b.op("Add", [b.op("Mul", [x, cos], f"{name}.xcos"), b.op("Mul", [rotated, sin], f"{name}.rsin")], name)


def _group_mask(b: _Builder, mask: str, group: int) -> str:
    """The additive mask (B, 1, 1, S, T) as (B, 1, G*S, T), one row per (query head in a group, new token), once
    per graph: the mask of `_attention_ops`' merged query rows."""
    name = f"mask.g{group}"
    if not any(n.output[0] == name for n in b.nodes):
        rows = b.op("Squeeze", [mask, b.ints("mask.ax1", [1])], "mask.rows")  # (B, 1, S, T)
        b.op("Tile", [rows, b.ints(f"{name}.repeats", [1, 1, group, 1])], name)
    return name


def _attention_ops(b: _Builder, q: str, k: str, v: str, mask: str, spec: DecoderSpec, name: str,
                   wide: bool) -> str:
    """softmax(q k^T / sqrt(d) + mask) v with q grouped per KV head: q (B, S, Hq, D), k/v (B, Hkv, T, D);
    `wide`: the reductions over the key axis in float64 (see ATTENTION_CORES).

    The G query heads that share a KV head and the S new tokens are the G*S rows of one matrix, so each matmul
    is one GEMM per KV head that reads (and packs) the head's cache once, not G broadcast GEMMs reading it G
    times: at 1,024 keys this halves the core's time. Each score is still one dot product over head_dim and
    each context row one sum over the keys, whatever the row count."""
    group, D = spec.num_heads // spec.num_kv_heads, spec.head_dim
    q = b.op("Reshape", [q, b.ints(f"{name}.qshape", [0, 0, spec.num_kv_heads, group, D])], f"{name}.q5")
    q = b.op("Transpose", [q], f"{name}.qt", perm=[0, 2, 3, 1, 4])  # (B, Hkv, G, S, D)
    q = b.op("Reshape", [q, b.ints(f"{name}.rows", [0, 0, -1, D])], f"{name}.q_rows")  # (B, Hkv, G*S, D)
    kt = b.op("Transpose", [k], f"{name}.kt", perm=[0, 1, 3, 2])  # (B, Hkv, D, T)
    scores = b.op("MatMul", [q, kt], f"{name}.qk")  # (B, Hkv, G*S, T)
    scores = b.op("Add", [b.op("Mul", [scores, b.scalar(f"{name}.scale", spec.attention_scale)], f"{name}.scaled"),
                          _group_mask(b, mask, group)], f"{name}.masked")
    if wide:  # exp in float32 (elementwise: order-free), the two sums over keys in float64
        top = b.op("ReduceMax", [scores, b.ints(f"{name}.last", [-1])], f"{name}.max", keepdims=1)
        e = b.op("Cast", [b.op("Exp", [b.op("Sub", [scores, top], f"{name}.shifted")], f"{name}.exp")],
                 f"{name}.exp64", to=TensorProto.DOUBLE)
        weighted = b.op("MatMul", [e, b.op("Cast", [v], f"{name}.v64", to=TensorProto.DOUBLE)], f"{name}.ev")
        total = b.op("ReduceSum", [e, f"{name}.last"], f"{name}.sum", keepdims=1)
        context = b.op("Cast", [b.op("Div", [weighted, total], f"{name}.pv64")], f"{name}.pv", to=TensorProto.FLOAT)
    else:
        probs = b.op("Softmax", [scores], f"{name}.probs", axis=-1)
        context = b.op("MatMul", [probs, v], f"{name}.pv")  # (B, Hkv, G*S, D)
    context = b.op("Reshape", [context, b.ints(f"{name}.groups", [0, 0, group, -1, D])], f"{name}.c5")
    context = b.op("Transpose", [context], f"{name}.ct", perm=[0, 3, 1, 2, 4])  # (B, S, Hkv, G, D)
    return b.op("Reshape", [context, b.ints(f"{name}.oshape", [0, 0, -1])], f"{name}.context")


def _attend(b: _Builder, q: str, k: str, v: str, mask: str, spec: DecoderSpec, i: int, attention: str) -> str:
    """Layer i's attention over its cache: q (B, S, Hq, D), k / v (B, S, Hkv, D) of the new tokens; writes
    present.{i}.key / value and returns the context (B, S, Hq * D)."""
    p = f"layers.{i}"
    k = b.op("Transpose", [k], f"{p}.k_t", perm=[0, 2, 1, 3])  # (B, Hkv, S, D)
    v = b.op("Transpose", [v], f"{p}.v_t", perm=[0, 2, 1, 3])
    if attention != "onnx":
        k = b.op("Concat", [f"past_key_values.{i}.key", k], f"present.{i}.key", axis=2)
        v = b.op("Concat", [f"past_key_values.{i}.value", v], f"present.{i}.value", axis=2)
        return _attention_ops(b, q, k, v, mask, spec, f"{p}.attn", wide=attention == "invariant")
    q = b.op("Transpose", [q], f"{p}.q_t", perm=[0, 2, 1, 3])  # (B, Hq, S, D)
    b.nodes.append(helper.make_node(
        "Attention", [q, k, v, mask, f"past_key_values.{i}.key", f"past_key_values.{i}.value"],
        [f"{p}.attn.y", f"present.{i}.key", f"present.{i}.value"], name=f"{p}.attn/Attention",
        q_num_heads=spec.num_heads, kv_num_heads=spec.num_kv_heads, scale=spec.attention_scale))
    y = b.op("Transpose", [f"{p}.attn.y"], f"{p}.attn.yt", perm=[0, 2, 1, 3])  # (B, S, Hq, D)
    return b.op("Reshape", [y, b.ints(f"{p}.oshape", [0, 0, -1])], f"{p}.attn.context")


def _gqa(b: _Builder, qkv: str, spec: DecoderSpec, i: int, bias: str,
         rotary: tuple[str, str] | Rotary | None) -> str:
    """Layer i's attention as one GroupQueryAttention node: the cache concat (present.{i}.*) and
    softmax(q k^T scale + bias) v on q (B, S, Hq D), k and v (B, S, Hkv D). Every row is given the full key
    length (seqlens_k = T - 1) and left padding is masked by `bias`, the additive (B, 1, S, T) mask; returns
    the context (B, S, Hq * D).

    With rotate_half tables (`Rotary`, head_dim a multiple of 16) the node takes the packed q|k|v and rotates
    q and k itself, at each token's cache index (GQA_POSITIONS): a prompt's run rotates position_ids[0, 0] + s
    for every row, so the positions must be the key axis's indices, which left padding shifts from the
    tokens' positions by the row's padding. Rotary scores depend on differences of positions only, and within
    a row both are the same, so the attention is the same to float32 rounding (bit-identical where nothing is
    padded). Other tables keep the split and the elementwise rotation at position_ids."""
    p = f"layers.{i}"
    D, Hkv = spec.head_dim, spec.num_kv_heads
    if _rotates_inside(spec, rotary):
        b.nodes.append(helper.make_node(
            "GroupQueryAttention", [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value",
                                    "gqa.seqlens_k", "gqa.total_length", rotary.cos, rotary.sin, GQA_POSITIONS, bias],
            [f"{p}.attn.context", f"present.{i}.key", f"present.{i}.value"], name=f"{p}.attn/GroupQueryAttention",
            domain="com.microsoft", num_heads=spec.num_heads, kv_num_heads=Hkv, scale=spec.attention_scale,
            do_rotary=1))
        return f"{p}.attn.context"
    q, k, v = (f"{p}.split.{j}" for j in range(3))
    b.op("Split", [qkv, b.ints(f"{p}.sizes", [spec.num_heads * D, Hkv * D, Hkv * D])], f"{p}.split", outputs=3, axis=-1)
    if isinstance(rotary, Rotary):
        q = b.op("RotaryEmbedding", [q, *rotary, "position_ids"], f"{p}.q_rope", num_heads=spec.num_heads)
        k = b.op("RotaryEmbedding", [k, *rotary, "position_ids"], f"{p}.k_rope", num_heads=Hkv)
    elif rotary is not None:  # the elementwise form on (B, S, H, D), back to (B, S, H D)
        q, k = (b.op("Reshape", [_rope(b, b.op("Reshape", [t, b.ints(f"{p}.{n}h", [0, 0, heads, D])], f"{p}.{n}4"),
                                       *rotary, D // 2, f"{p}.{n}_rope"), b.ints(f"{p}.{n}3", [0, 0, -1])],
                           f"{p}.{n}_rope3")
                for t, n, heads in ((q, "q", spec.num_heads), (k, "k", Hkv)))
    b.nodes.append(helper.make_node(
        "GroupQueryAttention", [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", "gqa.seqlens_k",
                                "gqa.total_length", "", "", "", bias],
        [f"{p}.attn.context", f"present.{i}.key", f"present.{i}.value"], name=f"{p}.attn/GroupQueryAttention",
        domain="com.microsoft", num_heads=spec.num_heads, kv_num_heads=Hkv, scale=spec.attention_scale))
    return f"{p}.attn.context"


def _rotates_inside(spec: DecoderSpec, rotary: tuple[str, str] | Rotary | None) -> bool:
    """Whether GroupQueryAttention rotates q and k itself: rotate_half tables, and a head_dim its rotary kernel
    takes (a multiple of 16 in ONNX Runtime 1.32; others rotate by RotaryEmbedding at position_ids first)."""
    return isinstance(rotary, Rotary) and spec.head_dim % 16 == 0


def _gqa_lengths(b: _Builder) -> None:
    """GroupQueryAttention's seqlens_k (B,) int32 = T - 1 for every row and total_sequence_length () int32 = T."""
    total = b.op("Cast", [b.op("Squeeze", ["total", "ax0"], "gqa.total64")], "gqa.total_length", to=TensorProto.INT32)
    rows = b.op("Gather", ["mask_shape", "ax0"], "gqa.rows")  # (1,) = B
    last = b.op("Sub", [total, b.init("gqa.one32", np.asarray(1, np.int32))], "gqa.last")
    b.op("Expand", [last, rows], "gqa.seqlens_k")


def _gqa_positions(b: _Builder) -> str:
    """The new tokens' rotary positions for GroupQueryAttention (B, S): position_ids plus the row's left
    padding before each token (attention_mask's zeros to its left, up to its first 1). For a left-padded row
    that is the token's cache index, the same for a pad (position 0, index j) as for a real token (position
    j - p, p pads); zeros after the first 1 (a finished row's columns in a batch still decoding) do not count,
    so no position outruns the rotary table. (A prefill chunk lying wholly inside a row's padding sees no 1
    yet: its pads rotate at 0, harmless, as they are masked.) A caller that moves a row's cache to other
    indices (the serving engine's batches) keeps its keys' rotation by feeding position_ids less the columns it
    moved the row by."""
    gap = b.op("Sub", ["one_s", "attention_mask"], "gqa.gap")  # one_s: _mask's int64 scalar 1
    before = b.op("CumSum", [gap, "one_s"], "gqa.gaps_before", exclusive=1)  # along axis 1
    lead = b.op("ArgMax", ["attention_mask"], "gqa.lead", axis=1, keepdims=1)  # (B, 1): the first 1's index
    start = b.op("Neg", ["seq"], "gqa.from")
    new = b.op("Slice", [before, start, b.ints("gqa.to", [2**62]), "one"], "gqa.gaps_new")
    return b.op("Add", ["position_ids", b.op("Min", [new, lead], "gqa.pads_before")], GQA_POSITIONS)


def _split_heads(b: _Builder, qkv: str, spec: DecoderSpec, p: str,
                 rotary: Rotary | None = None) -> tuple[str, str, str]:
    """The packed projection's q (B, S, Hq, D), k and v (B, S, Hkv, D); with `rotary` (fused tables), q and k
    rotated by ONNX's RotaryEmbedding at their positions first."""
    D, Hkv = spec.head_dim, spec.num_kv_heads
    q, k, v = (f"{p}.split.{j}" for j in range(3))
    b.op("Split", [qkv, b.ints(f"{p}.sizes", [spec.num_heads * D, Hkv * D, Hkv * D])], f"{p}.split", outputs=3, axis=-1)
    if rotary is not None:
        q = b.op("RotaryEmbedding", [q, *rotary, "position_ids"], f"{p}.q_rope", num_heads=spec.num_heads)
        k = b.op("RotaryEmbedding", [k, *rotary, "position_ids"], f"{p}.k_rope", num_heads=Hkv)
    q = b.op("Reshape", [q, b.ints(f"{p}.qh", [0, 0, spec.num_heads, D])], f"{p}.q4")
    k = b.op("Reshape", [k, b.ints(f"{p}.kh", [0, 0, Hkv, D])], f"{p}.k4")
    return q, k, b.op("Reshape", [v, f"{p}.kh"], f"{p}.v4")


def _llama_layer(b: _Builder, x: str, layer: torch.nn.Module, i: int, spec: DecoderSpec,
                 rope: tuple[str, str] | Rotary, mask: str, attention: str, linear) -> str:
    """x + attention(RMSNorm(x)) with rotary q / k, then + SwiGLU(RMSNorm(.))."""
    p, attn, mlp = f"layers.{i}", layer.self_attn, layer.mlp

    def norm(h: str, weight: torch.Tensor, name: str) -> str:
        return b.op("RMSNormalization", [h, b.init(f"{name}.weight", weight.detach().numpy())], name,
                    axis=-1, epsilon=spec.norm_eps)

    h = norm(x, layer.input_layernorm.weight, f"{p}.input_norm")
    qkv = linear(h, f"{p}.qkv", *_packed([attn.q_proj, attn.k_proj, attn.v_proj]))
    if attention == "gqa":
        context = _gqa(b, qkv, spec, i, mask, rope)
    elif isinstance(rope, Rotary):
        q, k, v = _split_heads(b, qkv, spec, p, rope)
    else:
        q, k, v = _split_heads(b, qkv, spec, p)
        q, k = (_rope(b, t, *rope, spec.head_dim // 2, f"{p}.{n}_rope") for t, n in ((q, "q"), (k, "k")))
    if attention != "gqa":
        context = _attend(b, q, k, v, mask, spec, i, attention)
    x = b.op("Add", [x, linear(context, f"{p}.o_proj", attn.o_proj.weight, attn.o_proj.bias)], f"{p}.attn_residual")
    h = norm(x, layer.post_attention_layernorm.weight, f"{p}.post_norm")
    gate_up = linear(h, f"{p}.gate_up", *_packed([mlp.gate_proj, mlp.up_proj]))
    gate, up = f"{p}.gu.0", f"{p}.gu.1"
    b.op("Split", [gate_up, b.ints(f"{p}.gu_sizes", [mlp.gate_proj.out_features] * 2)], f"{p}.gu", outputs=2, axis=-1)
    act = b.op("Mul", [b.op("Mul", [gate, b.op("Sigmoid", [gate], f"{p}.sig")], f"{p}.silu"), up], f"{p}.swiglu")
    down = linear(act, f"{p}.down_proj", mlp.down_proj.weight, mlp.down_proj.bias)
    return b.op("Add", [x, down], f"{p}.mlp_residual")


def _layer_norm(b: _Builder, h: str, norm: torch.nn.LayerNorm, name: str, eps: float) -> str:
    return b.op("LayerNormalization", [h, b.init(f"{name}.weight", norm.weight.detach().numpy()),
                                       b.init(f"{name}.bias", norm.bias.detach().numpy())], name, axis=-1, epsilon=eps)


def _gpt2_layer(b: _Builder, x: str, block: torch.nn.Module, i: int, spec: DecoderSpec, mask: str, attention: str,
                linear) -> str:
    """x + attention(LayerNorm(x)), then + MLP(LayerNorm(.)) with GELU; Conv1D weights are (in, out)."""
    p, attn, mlp = f"layers.{i}", block.attn, block.mlp
    h = _layer_norm(b, x, block.ln_1, f"{p}.ln_1", spec.norm_eps)
    qkv = linear(h, f"{p}.qkv", attn.c_attn.weight.T, attn.c_attn.bias)
    if attention == "gqa":
        context = _gqa(b, qkv, spec, i, mask, None)
    else:
        q, k, v = _split_heads(b, qkv, spec, p)
        context = _attend(b, q, k, v, mask, spec, i, attention)
    x = b.op("Add", [x, linear(context, f"{p}.o_proj", attn.c_proj.weight.T, attn.c_proj.bias)], f"{p}.attn_residual")
    h = _layer_norm(b, x, block.ln_2, f"{p}.ln_2", spec.norm_eps)
    act = b.op("Gelu", [linear(h, f"{p}.c_fc", mlp.c_fc.weight.T, mlp.c_fc.bias)], f"{p}.gelu",
               approximate=GPT2_ACTIVATIONS[spec.activation])
    return b.op("Add", [x, linear(act, f"{p}.down_proj", mlp.c_proj.weight.T, mlp.c_proj.bias)], f"{p}.mlp_residual")


def _mask(b: _Builder) -> str:
    """The additive (B, 1, 1, S, T) mask: key j is visible to new token i (at past + i) when j <= past + i
    and attention_mask[:, j] is 1; MASKED elsewhere."""
    seq = b.op("Gather", [b.op("Shape", ["input_ids"], "ids_shape"), b.ints("one", [1])], "seq")
    total = b.op("Gather", [b.op("Shape", ["attention_mask"], "mask_shape"), "one"], "total")
    past = b.op("Sub", [total, seq], "past_len")
    zero, step = b.init("zero_s", np.asarray(0, np.int64)), b.init("one_s", np.asarray(1, np.int64))
    squeeze = b.ints("ax0", [0])
    total_s = b.op("Squeeze", [total, squeeze], "total_s")
    key_pos = b.op("Range", [zero, total_s, step], "key_pos")  # (T,)
    query_pos = b.op("Range", [b.op("Squeeze", [past, squeeze], "past_s"), total_s, step], "query_pos")  # (S,)
    causal = b.op("LessOrEqual", [key_pos, b.op("Unsqueeze", [query_pos, b.ints("ax1", [1])], "query_col")],
                  "causal")  # (S, T)
    keep = b.op("Cast", ["attention_mask"], "keep", to=TensorProto.BOOL)
    allowed = b.op("And", [causal, b.op("Unsqueeze", [keep, b.ints("ax123", [1, 2, 3])], "keep5")], "allowed")
    return b.op("Where", [allowed, b.scalar("unmasked", 0.0), b.scalar("masked", MASKED)], "mask")


def _keep_last(b: _Builder, h: str) -> str:
    """h (B, S, H) cut to its last `logits_to_keep` positions (0, the default, or more than S: all of them), as
    transformers' `logits_to_keep`: generation needs the last position's logits only, scoring needs all."""
    b.init(LOGITS_TO_KEEP, np.asarray(0, np.int64))
    keep = b.op("Unsqueeze", [LOGITS_TO_KEEP, "ax0"], "keep.n")  # (1,)
    count = b.op("Where", [b.op("Equal", [keep, b.ints("keep.zero", [0])], "keep.all"), "seq",
                           b.op("Min", [keep, "seq"], "keep.min")], "keep.count")
    start = b.op("Neg", [count], "keep.start")
    return b.op("Slice", [h, start, b.ints("keep.end", [2**62]), "one"], "keep.h")


def build_decoder_graph(model: torch.nn.Module, precision: str = "fp32", attention: str = "invariant",
                        lora_modules: Collection[str] = (), rowwise: RowwisePlan | None = None) -> DecoderGraph:
    """The ONNX graph of a loaded causal LM (its weights as they are: merge adapters first, or give slots).

    Args:
        precision: "fp32", or "int8" (every linear and the LM head as MatMulNBits, bits 8, block 32;
            embeddings, norms and attention scores stay fp32).
        attention: "invariant" (MatMul / Softmax / MatMul grouped per KV head, softmax and probs @ v in
            float64: a row's logits are bit-identical alone and in a left-padded batch), "ops" (the same
            in float32), "onnx" (ONNX's Attention node, opset 23) or "gqa" (ONNX Runtime's
            GroupQueryAttention: the fastest); see ATTENTION_CORES.
        lora_modules: module names of the model (`model.layers.0.self_attn.q_proj`) that get a switchable
            LoRA slot, an adapter bank indexed per row by the `adapter_ids` input (exporters/switchable.py);
            a packed projection (q|k|v, gate|up) has slots on all its members or none. The base weights
            stay as they are (int8 in MatMulNBits), the LoRA branches float.
        rowwise: int8 only: the rowwise scheme (`RowwisePlan`: its recipe and SmoothQuant factors) instead of
            MatMulNBits everywhere: per-row int8 activations and per-channel weights through
            MatMulIntegerToFloat, except the recipe's `block_layers`, which stay MatMulNBits.
    """
    if attention not in ATTENTION_CORES:
        raise EdgeloraError(f"attention={attention!r} is not supported; choose from {', '.join(ATTENTION_CORES)}")
    spec = decoder_spec(model)
    if attention == "gqa" and spec.head_dim % 8:
        raise EdgeloraError(f"attention='gqa': GroupQueryAttention needs head_dim a multiple of 8, this base has "
                            f"{spec.head_dim}; export with attention='invariant'")
    b = _Builder()
    quantized: dict[str, QuantizedMatMul] = {}
    L, Hkv, D = spec.num_layers, spec.num_kv_heads, spec.head_dim

    banks: list[onnx.ValueInfoProto] = []
    wanted = set(lora_modules)

    head_name = next((n for n, m in model.named_modules() if m is model.get_output_embeddings()), "lm_head")
    if rowwise is not None and rowwise.quant.skip_layers:
        raise EdgeloraError(f"skip_layers={list(rowwise.quant.skip_layers)}: the decoder export keeps no layer fp32; "
                            "train without skip_layers")

    def linear(x: str, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> str:
        members = [m for m, _ in projection_modules(model, spec, name)] or [head_name]
        y = _linear(b, x, name, weight, bias, precision, quantized, _rowwise_choice(rowwise, name, members))
        modules = projection_modules(model, spec, name) if wanted else []
        adapted = [m for m, _ in modules if m in wanted]
        if not adapted:
            return y
        if len(adapted) != len(modules):
            missing = ", ".join(m for m, _ in modules if m not in wanted)
            raise EdgeloraError(f"LoRA slots on {', '.join(adapted)} but not on {missing}, packed with them into "
                                f"{name}; give slots to all of them")
        return _with_lora(b, y, x, name, modules, int(weight.shape[1]), banks)

    mask = _mask(b)
    if attention in ("onnx", "gqa"):
        mask = b.op("Squeeze", [mask, b.ints("ax1_", [1])], "mask4")  # (B, 1, S, T)
    if attention == "gqa":
        _gqa_lengths(b)
    embed = model.get_input_embeddings()
    x = b.op("Gather", [b.init("embed_tokens.weight", embed.weight.detach().numpy()), "input_ids"], "embed", axis=0)
    if spec.model_type == "gpt2":
        wpe = model.transformer.wpe.weight.detach().numpy()
        x = b.op("Add", [x, b.op("Gather", [b.init("wpe.weight", wpe), "position_ids"], "positions", axis=0)], "embed_pos")
        for i, block in enumerate(model.transformer.h):
            x = _gpt2_layer(b, x, block, i, spec, mask, attention, linear)
        h = _layer_norm(b, x, model.transformer.ln_f, "final_norm", spec.norm_eps)
    else:
        cos_table, sin_table = rotary_tables(model, spec.context_length)
        half = spec.head_dim // 2
        rope: tuple[str, str] | Rotary
        if all(np.array_equal(t[:, :half], t[:, half:]) for t in (cos_table, sin_table)):  # rotate_half's tables
            rope = Rotary(b.init("rope.cos", cos_table[:, :half]), b.init("rope.sin", sin_table[:, :half]))
        else:  # a table whose halves differ: the elementwise form, which takes any table
            cos = b.op("Gather", [b.init("rope.cos", cos_table), "position_ids"], "rope.cos_b", axis=0)  # (B, S, D)
            sin = b.op("Gather", [b.init("rope.sin", sin_table), "position_ids"], "rope.sin_b", axis=0)
            rope = (b.op("Unsqueeze", [cos, b.ints("ax2", [2])], "rope.cos_h"),  # (B, S, 1, D)
                    b.op("Unsqueeze", [sin, "ax2"], "rope.sin_h"))
        if attention == "gqa" and _rotates_inside(spec, rope):
            _gqa_positions(b)
        for i, layer in enumerate(model.model.layers):
            x = _llama_layer(b, x, layer, i, spec, rope, mask, attention, linear)
        h = b.op("RMSNormalization", [x, b.init("final_norm.weight", model.model.norm.weight.detach().numpy())],
                 "final_norm", axis=-1, epsilon=spec.norm_eps)

    h = _keep_last(b, h)
    head = model.get_output_embeddings()
    if precision == "fp32" and head.weight is embed.weight:  # x @ E^T, no second copy of E: (B*S, H) Gemm(transB)
        flat = b.op("Reshape", [h, b.ints("flat", [-1, spec.hidden_size])], "head.flat")
        logits = b.op("Gemm", [flat, "embed_tokens.weight"], "head.gemm", transB=1)
        batch = b.op("Gather", ["ids_shape", "ax0"], "batch")
        out_shape = b.op("Concat", [batch, b.ints("rest", [-1, spec.vocab_size])], "head.shape", axis=0)
        logits = b.op("Reshape", [logits, out_shape], "logits")
    else:
        logits = b.op("Identity", [linear(h, "lm_head", head.weight, head.bias)], "logits")

    def io(name: str, elem: int, dims: list) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, elem, dims)

    cache_in = ["batch", Hkv, "past_sequence", D]
    cache_out = ["batch", Hkv, "total_sequence", D]
    inputs = [io("input_ids", TensorProto.INT64, ["batch", "sequence"]),
              io("attention_mask", TensorProto.INT64, ["batch", "total_sequence"]),
              io("position_ids", TensorProto.INT64, ["batch", "sequence"])]
    inputs += [io(n, TensorProto.FLOAT, cache_in) for n in input_names(L)[3:]]
    if banks:  # overridable initializers: each bank and the rows' entries in it (the adapter's own file: [0])
        missing = sorted(wanted - {v.name.removeprefix("model.base.").rsplit(".", 1)[0] for v in banks})
        if missing:
            raise EdgeloraError(f"lora_modules {missing[:3]} are not projections of this {spec.model_type} graph")
        inputs += [*banks, io(ADAPTER_IDS, TensorProto.INT64, ["adapter_rows"])]
        b.init(ADAPTER_IDS, np.zeros(1, np.int64))
    inputs.append(io(LOGITS_TO_KEEP, TensorProto.INT64, []))  # overridable: its initializer (0) keeps every position
    outputs = [io("logits", TensorProto.FLOAT, ["batch", "logits_sequence", spec.vocab_size])]
    outputs += [io(n, TensorProto.FLOAT, cache_out) for n in output_names(L)[1:]]
    graph = helper.make_graph(b.nodes, f"edgelora-{spec.model_type}-decoder", inputs, outputs, initializer=b.inits)
    opsets = [helper.make_opsetid("", OPSET)]
    if any(n.domain == "com.microsoft" for n in b.nodes):  # MatMulNBits, GroupQueryAttention
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="edgelora")
    proto.ir_version = IR_VERSION
    return DecoderGraph(proto, spec, quantized, tuple(v.name for v in banks))
