"""The rowwise int8 scheme's weight grids on this CPU: one MatMulIntegerToFloat per grid, timed interleaved.

For a K x N layer (SmolLM2's gate|up by default) and M rows, each candidate is one ONNX Runtime session of one
node, fed the same per-row-quantized activations (uint8 at zero point 128, or int8 for s8 x s8):
  u8s8-7     7-bit weights, int8            (MLAS u8 x s8: what rowwise exports on CPUs that saturate 8 bits)
  u8s8-8     8-bit weights, int8            (u8 x s8: VNNI's fast path; saturates 16-bit pair sums on AVX2)
  u8u8-8     8-bit weights, uint8 at 128    (u8 x u8: 16-bit widening, never saturates)
  s8s8-8     8-bit weights, int8, A int8    (s8 x s8, no zero point)
  nbits-b32  MatMulNBits 8-bit, block 32, accuracy_level 4 on float input (the block scheme), for scale
Each integer candidate's error is max |y - exact| / max |exact| against the int64 product, so a saturating kernel
shows. Prints median ms per run over interleaved rounds and the ratio to u8s8-7, with the CPU's int8 ISA.

    python benchmarks/rowwise_grids.py --rows 1,4,256 --threads 1
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgelora.runtime.cpu import detect_isa


def _session(nodes, inputs, inits, threads: int) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def integer_session(grid: np.ndarray, a_type: int, threads: int) -> ort.InferenceSession:
    """Y = (A - a_zp) (B - b_zp) * b_scale for A (M, K) of `a_type` and the (K, N) weight `grid`."""
    k, n = grid.shape
    inits = [numpy_helper.from_array(grid, "B"), numpy_helper.from_array(np.asarray(1.0, np.float32), "a_scale"),
             numpy_helper.from_array(np.full(n, 0.01, np.float32), "b_scale")]
    names = ["A", "B", "a_scale", "b_scale"]
    if a_type == TensorProto.UINT8:
        inits.append(numpy_helper.from_array(np.asarray(128, np.uint8), "a_zp"))
        names.append("a_zp")
    if grid.dtype == np.uint8:
        if len(names) == 4:
            raise ValueError("a uint8 grid takes uint8 activations")
        inits.append(numpy_helper.from_array(np.asarray(128, np.uint8), "b_zp"))
        names.append("b_zp")
    node = helper.make_node("MatMulIntegerToFloat", names, ["Y"], domain="com.microsoft")
    return _session([node], [helper.make_tensor_value_info("A", a_type, ["M", k])], inits, threads)


def nbits_session(k: int, n: int, threads: int, rng: np.random.Generator) -> ort.InferenceSession:
    blocks = k // 32
    inits = [numpy_helper.from_array(rng.integers(0, 256, (n, blocks, 32)).astype(np.uint8), "W"),
             numpy_helper.from_array(np.full(n * blocks, 0.01, np.float32), "S")]
    node = helper.make_node("MatMulNBits", ["X", "W", "S"], ["Y"], domain="com.microsoft", K=k, N=n, bits=8,
                            block_size=32, accuracy_level=4)
    return _session([node], [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", k])], inits, threads)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=576)
    parser.add_argument("--n", type=int, default=3072)
    parser.add_argument("--rows", default="1,4,256")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    if args.k % 32:
        parser.error(f"--k {args.k}: MatMulNBits' blocks of 32 need a multiple of 32")
    rng = np.random.default_rng(0)
    q7 = rng.integers(-63, 64, (args.k, args.n)).astype(np.int8)
    q8 = rng.integers(-127, 128, (args.k, args.n)).astype(np.int8)
    u8 = (q8.astype(np.int16) + 128).astype(np.uint8)
    sessions = {"u8s8-7": (integer_session(q7, TensorProto.UINT8, args.threads), q7, "u8"),
                "u8s8-8": (integer_session(q8, TensorProto.UINT8, args.threads), q8, "u8"),
                "u8u8-8": (integer_session(u8, TensorProto.UINT8, args.threads), q8, "u8"),
                "s8s8-8": (integer_session(q8, TensorProto.INT8, args.threads), q8, "s8"),
                "nbits-b32": (nbits_session(args.k, args.n, args.threads, rng), None, "f32")}
    print(f"{args.k} x {args.n} layer, {args.threads} thread(s), int8 path {detect_isa().isa}, onnxruntime "
          f"{ort.__version__}, median ms of {args.rounds} interleaved rounds")
    for m in (int(r) for r in args.rows.split(",")):
        a8 = rng.integers(-127, 128, (m, args.k)).astype(np.int8)
        feeds = {"u8": {"A": (a8.astype(np.int16) + 128).astype(np.uint8)}, "s8": {"A": a8},
                 "f32": {"X": rng.standard_normal((m, args.k)).astype(np.float32)}}
        errors = {}
        for name, (sess, grid, kind) in sessions.items():
            if grid is not None:
                exact = (a8.astype(np.int64) @ grid.astype(np.int64)) * 0.01
                errors[name] = float(np.abs(sess.run(None, feeds[kind])[0] - exact).max() / np.abs(exact).max())
        times: dict[str, list[float]] = {name: [] for name in sessions}
        reps = max(1, 200 // m)
        for _ in range(args.rounds):
            for name, (sess, _, kind) in sessions.items():
                t0 = time.perf_counter()
                for _ in range(reps):
                    sess.run(None, feeds[kind])
                times[name].append((time.perf_counter() - t0) / reps * 1e3)
        base = float(np.median(times["u8s8-7"]))
        cells = [f"{name} {float(np.median(t)):.3f} ms ({float(np.median(t)) / base:.2f}x"
                 + (f", err {errors[name]:.1e})" if name in errors else ")") for name, t in times.items()]
        print(f"M={m}: " + "  ".join(cells))


if __name__ == "__main__":
    main()
