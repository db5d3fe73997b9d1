"""Which attention core ONNX Runtime's CPU runs fastest for q, k, v that come from int8 projections.

Merged bundles fuse each layer into one QAttention (the int8 q/k/v projection and the attention in one
kernel). Switchable bundles cannot: a float LoRA joins q, k and v between the projection and the
attention, so the core has to take q, k, v as inputs. ORT offers two such cores: its own
MultiHeadAttention (com.microsoft) and ONNX's Attention (opset 23). This builds three graphs of six
MiniLM-sized layers (hidden 384, 12 heads) from the same random int8 weights and the same raw
(batch, seq) mask, checks that they compute the same outputs, and times them interleaved in one process:

  qattention   DynamicQuantizeLinear -> QAttention
  mha          DynamicQuantizeLinear -> MatMulIntegerToFloat (+bias) -> Split -> MultiHeadAttention
  onnx         DynamicQuantizeLinear -> MatMulIntegerToFloat (+bias) -> Split -> Attention (the exporter's
               additive mask, `switchable_fusion.additive_mask`)

    python benchmarks/attention_cores.py --shapes 1x32,1x128,8x128 --threads 2 --rounds 200
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgelora.exporters.switchable_fusion import additive_mask

HIDDEN, HEADS, LAYERS = 384, 12, 6


def _model(core: str, batch: int, seq: int) -> bytes:
    rng = np.random.default_rng(0)
    weight = rng.integers(-63, 64, (HIDDEN, 3 * HIDDEN)).astype(np.int8)  # 7-bit, as on AVX2 without VNNI
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.full(3 * HIDDEN, 2e-3, np.float32), "w_scale"),
             numpy_helper.from_array((rng.standard_normal(3 * HIDDEN) * 0.1).astype(np.float32), "bias"),
             numpy_helper.from_array(np.array(0, np.int8), "w_zero")]
    nodes = []
    if core == "onnx":  # the exporter's own additive (batch, 1, seq, seq) mask, once for all layers
        mask_nodes, constants = additive_mask("mask", "additive")
        nodes += mask_nodes
        inits += [numpy_helper.from_array(v, k) for k, v in constants.items()]
    x = "x"
    for i in range(LAYERS):
        out = "y" if i == LAYERS - 1 else f"h{i}"
        nodes.append(helper.make_node("DynamicQuantizeLinear", [x], [f"q{i}", f"s{i}", f"z{i}"]))
        if core == "qattention":
            nodes.append(helper.make_node("QAttention", [f"q{i}", "w", "bias", f"s{i}", "w_scale", "mask", f"z{i}", "w_zero"],
                                          [out], domain="com.microsoft", num_heads=HEADS))
        else:
            bias = [] if core == "mha" else ["bias"]  # MultiHeadAttention adds the bias itself
            nodes.append(helper.make_node("MatMulIntegerToFloat", [f"q{i}", "w", f"s{i}", "w_scale", f"z{i}", "w_zero", *bias],
                                          [f"m{i}"], domain="com.microsoft"))
            nodes.append(helper.make_node("Split", [f"m{i}"], [f"Q{i}", f"K{i}", f"V{i}"], axis=-1, num_outputs=3))
            if core == "mha":
                nodes.append(helper.make_node("MultiHeadAttention", [f"Q{i}", f"K{i}", f"V{i}", "bias", "mask"], [out],
                                              domain="com.microsoft", num_heads=HEADS))
            else:
                nodes.append(helper.make_node("Attention", [f"Q{i}", f"K{i}", f"V{i}", "additive"], [out],
                                              q_num_heads=HEADS, kv_num_heads=HEADS))
        x = out
    graph = helper.make_graph(nodes, core, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, seq, HIDDEN]),
                                            helper.make_tensor_value_info("mask", TensorProto.INT32, [batch, seq])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)]).SerializeToString()


def sessions_and_feeds(batch: int, seq: int, options: ort.SessionOptions) -> tuple[dict, dict[str, np.ndarray]]:
    """The three cores' sessions, and inputs whose last row is half padding when the batch has several rows."""
    rng = np.random.default_rng(1)
    mask = np.ones((batch, seq), np.int32)
    if batch > 1:
        mask[-1, seq // 2:] = 0
    feeds = {"x": rng.standard_normal((batch, seq, HIDDEN)).astype(np.float32), "mask": mask}
    sessions = {core: ort.InferenceSession(_model(core, batch, seq), options, providers=["CPUExecutionProvider"])
                for core in ("qattention", "mha", "onnx")}
    return sessions, feeds


def relative_differences(sessions: dict, feeds: dict[str, np.ndarray]) -> dict[str, float]:
    """Each core's max abs difference to QAttention's output, relative to its largest value."""
    outputs = {core: s.run(None, feeds)[0] for core, s in sessions.items()}
    scale = float(np.abs(outputs["qattention"]).max())
    return {core: float(np.abs(o - outputs["qattention"]).max()) / scale for core, o in outputs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1x32,1x128,8x128", help="batch x tokens, comma separated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, {args.rounds} interleaved rounds, "
          f"{LAYERS} layers of hidden {HIDDEN}; medians, and each core's median per-round ratio to QAttention")
    for shape in args.shapes.split(","):
        batch, seq = (int(v) for v in shape.split("x"))
        sessions, feeds = sessions_and_feeds(batch, seq, options)
        diffs = relative_differences(sessions, feeds)
        times: dict[str, list[float]] = {core: [] for core in sessions}
        for _ in range(args.rounds):
            for core, s in sessions.items():
                start = time.perf_counter()
                s.run(None, feeds)
                times[core].append(time.perf_counter() - start)
        base = np.array(times["qattention"])
        cells = [f"{core} {np.median(t) * 1e3:.3f} ms ({np.median(np.array(t) / base):.2f}x, rel diff {diffs[core]:.0e})"
                 for core, t in times.items()]
        print(f"{shape:>6}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
