"""Which int8 kernel ONNX Runtime gives a decoder's linears on this CPU, and what each recipe costs in fidelity.

The decoder goals of issue 17 (decode at least llama.cpp Q8_0's rate, int8 >= 3x fp32, 4 rows >= 2.5x one row)
are bound by the kernel that runs the weights. This times, in one process, interleaved rounds, medians, one
graph per kernel holding --layers transformer layers of SmolLM2's real linear shapes as the export packs them
(q/k/v in one, o, gate/up in one, down), at --rows rows (1: a decode step, 4: four sequences decoding together,
256: a prompt's prefill):

  nbits-b32    MatMulNBits bits 8, block 32, accuracy_level 4: int8 compute, activations quantized per row and
               block of 32 inside the op (the export's kernel and recipe)
  nbits-b128   the same with blocks of 128 (fewer scale bytes)
  nbits-fp32   MatMulNBits bits 8, block 32, accuracy_level 1: the weights dequantized, fp32 compute
  rowwise      activations quantized per row, symmetric, by plain ops (the row's max), and per-output-channel
               int8 weights, through MatMulIntegerToFloat (MLAS's u8s8 GEMM) and a Mul by the row scales:
               batch-invariant like nbits, but another recipe
  per-tensor   DynamicQuantizeMatMul: one activation scale for the whole batch (a row's result depends on
               its batch-mates, so the serving engine could not mix requests)
  fp32         MatMul on float32 weights

Weights are random: a kernel's time does not depend on their values. With --fidelity, each recipe's cost in
accuracy on the real SmolLM2 (torch, the project's fake quantizers; every linear and the LM head quantized):
the perplexity ratio to fp32 on the held-out texts of `edgelora bench` and the greedy agreement with fp32 on its
prompts, for block 32 (the export's), per-row activations with per-channel weights, and the same after
SmoothQuant (alpha 0.5, factors from a few calibration sentences; down_proj and the LM head kept at block 32,
where the outliers are).

    python benchmarks/int8_kernels.py --threads 1 --fidelity --json benchmarks/results/int8_kernels_avx2.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgelora.atomic import write_text_atomic

SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
KERNELS = ("nbits-b32", "nbits-b128", "nbits-fp32", "rowwise", "per-tensor", "fp32")
CALIBRATION = (
    "Set the living room lights to forty percent and turn on the fan.",
    "Minutes of the weekly meeting: the team reviewed the budget and agreed to hire two engineers in March.",
    "Water boils at one hundred degrees Celsius at sea level, and at lower temperatures on a mountain.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "The train from Paris arrived forty minutes late because of a signal failure near Lyon.",
    "Please write a short poem about autumn leaves falling in a quiet park.",
)


def layer_linears(config: dict) -> list[tuple[str, str, int, int]]:
    """(name, input, K, N) of one layer's linears, packed as exporters/decoder_graph.py packs them."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * hidden // config["num_attention_heads"]
    return [("qkv", "norm", hidden, hidden + 2 * kv), ("o", "context", hidden, hidden),
            ("gate_up", "norm", hidden, 2 * inter), ("down", "swiglu", inter, hidden)]


class _Graph:
    """Nodes and initializers of one kernel's timing graph."""

    def __init__(self, rng: np.random.Generator, weight_bits: int = 8):
        self.qmax = (1 << (weight_bits - 1)) - 1
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.rng = rng
        self.quantized: dict[str, tuple[str, str]] = {}

    def const(self, name: str, value) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, domain: str = "", **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], domain=domain, **attrs))
        return output

    def row_quantized(self, x: str) -> tuple[str, str]:
        """(uint8 q + 128, float row scale) of x: symmetric per row, one set of nodes per distinct input."""
        if x not in self.quantized:
            amax = self.node("ReduceMax", [self.node("Abs", [x], f"{x}.abs"), "last"], f"{x}.amax", keepdims=1)
            amax = self.node("Max", [amax, "tiny"], f"{x}.amax_safe")
            scaled = self.node("Mul", [x, self.node("Div", ["q127", amax], f"{x}.inverse")], f"{x}.scaled")
            shifted = self.node("Add", [self.node("Round", [scaled], f"{x}.round"), "q128"], f"{x}.shifted")
            self.quantized[x] = (self.node("Cast", [shifted], f"{x}.q", to=TensorProto.UINT8),
                                 self.node("Div", [amax, "q127"], f"{x}.scale"))
        return self.quantized[x]

    def linear(self, kind: str, name: str, x: str, k: int, n: int) -> str:
        if kind.startswith("nbits"):
            block = 128 if kind == "nbits-b128" else 32
            blocks = -(-k // block)
            w = self.const(f"{name}.w", self.rng.integers(0, 256, (n, blocks, block), dtype=np.uint8))
            s = self.const(f"{name}.s", self.rng.uniform(1e-3, 1e-2, n * blocks).astype(np.float32))
            return self.node("MatMulNBits", [x, w, s], name, domain="com.microsoft", K=k, N=n, bits=8,
                             block_size=block, accuracy_level=1 if kind == "nbits-fp32" else 4)
        if kind == "fp32":
            return self.node("MatMul", [x, self.const(f"{name}.w", self.rng.normal(0, 0.02, (k, n)).astype(np.float32))],
                             name)
        w = self.const(f"{name}.w", self.rng.integers(-self.qmax, self.qmax + 1, (k, n), dtype=np.int8))
        s = self.const(f"{name}.s", self.rng.uniform(1e-3, 1e-2, n).astype(np.float32))
        if kind == "per-tensor":
            return self.node("DynamicQuantizeMatMul", [x, w, s], name, domain="com.microsoft")
        q, row_scale = self.row_quantized(x)
        y = self.node("MatMulIntegerToFloat", [q, w, "one", s, "zp128"], f"{name}.unscaled", domain="com.microsoft")
        return self.node("Mul", [y, row_scale], name)


def kernel_graph(kind: str, config: dict, layers: int, weight_bits: int = 8, seed: int = 0) -> onnx.ModelProto:
    """`layers` layers of the model's linears on `kind`, chained through residual Adds so none is dead code.

    `weight_bits` bounds the u8s8 kernels' weights (rowwise, per-tensor): 7 where their 16-bit pair sums
    would saturate (AVX2 without VNNI; `edgelora.runtime.cpu.int8_saturates`), so they compute their recipe.
    """
    g = _Graph(np.random.default_rng(seed), weight_bits)
    hidden = config["hidden_size"]
    for name, value in (("last", np.array([-1], np.int64)), ("tiny", np.float32(1e-30)), ("q127", np.float32(127)),
                        ("q128", np.float32(128)), ("one", np.float32(1)), ("zp128", np.uint8(128)),
                        ("start", np.array([0], np.int64)), ("end", np.array([hidden], np.int64))):
        g.const(name, value)
    x = "x"
    for i in range(layers):
        shapes = {name: (k, n) for name, _, k, n in layer_linears(config)}
        qkv = g.linear(kind, f"l{i}.qkv", x, *shapes["qkv"])
        context = g.node("Slice", [qkv, "start", "end", "last"], f"l{i}.context")  # stands in for attention
        h = g.node("Add", [x, g.linear(kind, f"l{i}.o", context, *shapes["o"])], f"l{i}.h")
        gate_up = g.linear(kind, f"l{i}.gate_up", h, *shapes["gate_up"])
        gate, up = f"l{i}.gate", f"l{i}.up"
        g.nodes.append(helper.make_node("Split", [gate_up], [gate, up], axis=-1, num_outputs=2))
        swiglu = g.node("Mul", [g.node("Mul", [gate, g.node("Sigmoid", [gate], f"{gate}.sig")], f"{gate}.silu"), up],
                        f"l{i}.swiglu")
        x = g.node("Add", [h, g.linear(kind, f"l{i}.down", swiglu, *shapes["down"])], f"l{i}.out")
    graph = helper.make_graph(g.nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", hidden])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["rows", hidden])], g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


def session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def time_kernels(config: dict, kinds: list[str], rows: list[int], layers: int, rounds: int, threads: int,
                 weight_bits: int) -> dict:
    """Median ms per layer of each kernel at each row count, rounds interleaved (A B C A B C ...)."""
    sessions = {kind: session(kernel_graph(kind, config, layers, weight_bits), threads) for kind in kinds}
    result: dict[str, dict[str, float]] = {}
    for m in rows:
        feeds = {"x": np.random.default_rng(1).normal(0, 0.5, (m, config["hidden_size"])).astype(np.float32)}
        repeats = max(1, 64 // m)
        for s in sessions.values():
            for _ in range(3):
                s.run(None, feeds)
        times: dict[str, list[float]] = {kind: [] for kind in kinds}
        for _ in range(rounds):
            for kind, s in sessions.items():
                t0 = time.perf_counter()
                for _ in range(repeats):
                    s.run(None, feeds)
                times[kind].append((time.perf_counter() - t0) / repeats / layers * 1e3)
        result[str(m)] = {kind: float(np.median(t)) for kind, t in times.items()}
    return result


def _recipe_fidelity(model, tokenizer, recipes: dict) -> dict:
    """Perplexity ratio and greedy agreement of each recipe, with the LM head untied from the embeddings."""
    import torch

    from edgelora.fake_quant import fake_quantize_activation_blockwise
    from edgelora.runtime.fidelity import AGREEMENT_PROMPTS, HELD_OUT_TEXTS, greedy_agreement

    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    original = {name: m.weight.detach().clone() for name, m in linears.items()}
    ranges: dict[str, torch.Tensor] = {}

    def forward(name, module):
        def run(x):
            if module.record:
                m = x.detach().abs().reshape(-1, x.shape[-1]).amax(0)
                ranges[name] = m if name not in ranges else torch.maximum(ranges[name], m)
            if module.smooth is not None:
                x = x / module.smooth
            if module.act_block:
                x = fake_quantize_activation_blockwise(x, module.act_block)
            return torch.nn.functional.linear(x, module.weight, module.bias)
        return run

    for name, m in linears.items():
        m.record, m.smooth, m.act_block = True, None, 0
        m.forward = forward(name, m)
    with torch.no_grad():
        for text in CALIBRATION:
            model(tokenizer(text, return_tensors="pt").input_ids)
    groups = []
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        groups += [[f"{p}.self_attn.{n}_proj" for n in "qkv"], [f"{p}.self_attn.o_proj"],
                   [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], [f"{p}.mlp.down_proj"]]
    groups.append(["lm_head"])

    def configure(rule) -> None:
        for group in groups:
            quantize, act_block, alpha = rule(group[0])
            s = None
            if alpha is not None:
                w_max = torch.stack([original[n].abs().amax(0) for n in group]).amax(0).clamp(min=1e-5)
                s = (ranges[group[0]].clamp(min=1e-5) ** alpha / w_max ** (1 - alpha)).clamp(min=1e-5)
            for n in group:
                m, w = linears[n], original[n] * (1 if s is None else s)
                m.weight.data = w if quantize is None else quantize(w)
                m.smooth, m.act_block, m.record = s, act_block(m.in_features) if act_block else 0, False

    def measure() -> tuple[float, list[list[int]]]:
        nll, count, continuations = 0.0, 0, []
        with torch.no_grad():
            for text in HELD_OUT_TEXTS:
                ids = tokenizer(text, return_tensors="pt").input_ids
                nll += model(ids, labels=ids).loss.item() * (ids.shape[1] - 1)
                count += ids.shape[1] - 1
            for prompt in AGREEMENT_PROMPTS:
                ids = tokenizer(prompt, return_tensors="pt").input_ids
                out = model.generate(ids, max_new_tokens=24, do_sample=False)
                continuations.append(out[0, ids.shape[1]:].tolist())
        return math.exp(nll / count), continuations

    configure(lambda _: (None, None, None))
    reference_ppl, reference = measure()
    out = {}
    for label, rule in recipes.items():
        configure(rule)
        ppl, continuations = measure()
        agreement = greedy_agreement(continuations, reference)
        out[label] = {"perplexity_ratio": ppl / reference_ppl, "agreement": agreement["prefix_share"],
                      "exact": agreement["exact_share"]}
    return out


def fidelity() -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgelora.embedded import smollm2_path
    from edgelora.fake_quant import fake_quantize_weight, fake_quantize_weight_blockwise

    torch.manual_seed(0)
    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def row(in_features: int) -> int:  # one block spanning the whole row (zero padding changes no max)
        return 1 << max(4, (in_features - 1).bit_length())

    def block32(_: int) -> int:
        return 32

    def channel(bits: int):
        return lambda w: fake_quantize_weight(w, bits)

    def outliers(name: str) -> bool:
        return name.endswith("down_proj") or name == "lm_head"

    export = (fake_quantize_weight_blockwise, block32, None)
    recipes = {
        "block 32 (the export's)": lambda name: export,
        "per-row act, per-channel 8-bit weight": lambda name: (channel(8), row, None),
        "per-row act, per-channel 7-bit weight": lambda name: (channel(7), row, None),
        "per-row + SmoothQuant 0.5, 7-bit; down, head block 32": lambda name: (
            export if outliers(name) else (channel(7), row, 0.5)),
    }
    return _recipe_fidelity(model, AutoTokenizer.from_pretrained(path), recipes)


def cpu_line() -> str:
    from decoder_peers import lscpu_isa

    from edgelora.runtime.cpu import detect_isa

    info = detect_isa()
    return (f"{info.model}, {info.physical_cores} physical cores, int8 path {info.isa} (lscpu: {lscpu_isa()}), "
            f"onnxruntime {ort.__version__}")


def table(r: dict) -> str:
    kinds = list(next(iter(r["ms_per_layer"].values())))
    lines = [f"CPU: {r['cpu']}; {r['threads']} intra-op thread(s); ms per layer (median of {r['rounds']} "
             f"interleaved rounds), ratio to nbits-b32 in brackets; rowwise and per-tensor with "
             f"{r.get('u8s8_weight_bits', 8)}-bit weights", "",
             "| rows | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for m, times in r["ms_per_layer"].items():
        base = times["nbits-b32"] if "nbits-b32" in times else None
        cells = [f"{t:.3f}" + (f" ({t / base:.2f})" if base else "") for t in times.values()]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if "nbits-b32" in kinds and len(r["ms_per_layer"]) > 1:
        one = r["ms_per_layer"].get("1", {}).get("nbits-b32")
        for m, times in r["ms_per_layer"].items():
            if one and m != "1":
                scaling = {k: times[k] / r["ms_per_layer"]["1"][k] for k in kinds}
                lines.append(f"\n{m} rows cost " + ", ".join(f"{k} {v:.2f}x" for k, v in scaling.items())
                             + " the time of 1 row")
    if r.get("fidelity"):
        lines += ["", "| recipe (SmolLM2, torch fake quant) | perplexity ratio | greedy agreement (exact) |",
                  "|---|---|---|"]
        lines += [f"| {k} | {v['perplexity_ratio']:.4f} | {v['agreement']:.3f} ({v['exact']:.2f}) |"
                  for k, v in r["fidelity"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", default=",".join(KERNELS), help=f"from {', '.join(KERNELS)}")
    parser.add_argument("--rows", default="1,4,256")
    parser.add_argument("--layers", type=int, default=4, help="layers per timing graph")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fidelity", action="store_true", help="also each recipe's perplexity ratio and agreement")
    parser.add_argument("--json", type=Path, help="write the figures here (and the table beside it, .md)")
    args = parser.parse_args(argv)
    kinds = [k for k in args.kernels.split(",") if k]
    unknown = sorted(set(kinds) - set(KERNELS))
    if unknown:
        parser.error(f"--kernels: unknown {', '.join(unknown)}; choose from {', '.join(KERNELS)}")
    from edgelora.embedded import smollm2_path

    config = json.loads((smollm2_path() / "config.json").read_text())
    from edgelora.runtime.cpu import detect_isa, recommended_weight_bits

    bits = recommended_weight_bits(detect_isa().isa)
    result = {"command": "python benchmarks/int8_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "cpu": cpu_line(), "threads": args.threads, "rounds": args.rounds, "u8s8_weight_bits": bits, "model_shapes": {k: config[k] for k in SHAPE_KEYS},
              "ms_per_layer": time_kernels(config, kinds, [int(v) for v in args.rows.split(",")], args.layers,
                                           args.rounds, args.threads, bits)}
    if args.fidelity:
        result["fidelity"] = fidelity()
    text = table(result)
    print(text)
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
        write_text_atomic(args.json.with_suffix(".md"), f"`{result['command']}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
