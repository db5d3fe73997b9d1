"""The `edgelora` command: every verb's parser, every print, and the one error wrapper (`main`).

A module per family: train.py (train, calibrate), export.py (export, add-adapter), run.py (run, bench),
serve.py (serve), extract.py (extract, reduce); common.py holds the progress bar and what they share.
Every verb prints a user's mistake as one line (`edgelora: error: ...`) and exits 2, and anything
unexpected as one line and exit 1; `--debug` (anywhere on the line) shows the traceback. Warnings print
as one `edgelora: warning: ...` line. `main` imports only the module of the verb it runs (`VERBS`), and
the verb modules import the library inside their commands (torch only in train, calibrate, export,
add-adapter, extract, reduce), so `run`, `bench` and `serve` work on a runtime-only install (onnxruntime,
numpy, tokenizers) and `--help` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Sequence

from edgelora import __version__
from edgelora.errors import EdgeloraError


# verb: (help, module in edgelora.cli, what it calls to add the verb's arguments, what runs it)
VERBS: dict[str, tuple[str, str, str, str]] = {
    "train": ("fine-tune a LoRA or bottleneck adapter (and its head) on a frozen base",
              "train", "add_train_arguments", "train_command"),
    "calibrate": ("static int8 after training: calibrate a trained adapter's activation ranges for export",
                  "train", "add_calibrate_arguments", "calibrate_command"),
    "export": ("base + adapters -> a checked ONNX bundle (merged or switchable, fp32 or int8)",
               "export", "add_export_arguments", "export_command"),
    "run": ("run a bundle on text and print JSON predictions", "run", "add_run_arguments", "run_command"),
    "bench": ("int8 vs fp32 latency, throughput, size and memory, interleaved in one run",
              "run", "add_bench_arguments", "bench_command"),
    "serve": ("HTTP inference with per-request adapter choice (decoders: OpenAI's API, continuous batching)", "serve",
              "add_serve_arguments", "serve_command"),
    "generate": ("generate text with a decoder bundle, streamed to stdout (--chat: a conversation)",
                 "generate", "add_arguments", "command"),
    "add-adapter": ("add trained adapters to a switchable bundle without re-exporting its base",
                    "export", "add_adapter_arguments", "add_adapter_command"),
    "extract": ("SVD: a LoRA adapter of rank K (or energy F) from a full fine-tune and its base",
                "extract", "add_extract_arguments", "extract_command"),
    "reduce": ("lower a LoRA adapter's rank: truncated SVD of each layer's B A",
               "extract", "add_reduce_arguments", "reduce_command"),
}


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The `edgelora` parser; given `verb`, only that verb's module is imported and its arguments added."""
    parser = argparse.ArgumentParser(prog="edgelora", description="Train adapters, export int8 ONNX, run on CPUs.")
    parser.add_argument("--version", action="version", version=f"edgelora {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (help, module_name, add_arguments, command) in VERBS.items():
        p = sub.add_parser(name, help=help)
        if verb is None or verb == name:
            module = importlib.import_module(f"edgelora.cli.{module_name}")
            getattr(module, add_arguments)(p)
            p.set_defaults(func=getattr(module, command))
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"edgelora: warning: {str(message).strip().splitlines()[0] if str(message).strip() else category.__name__}",
          file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    end = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:end]  # accepted after the verb too, where users type it
    argv = [a for i, a in enumerate(argv) if not (i < end and a == "--debug")]
    verb = next((a for a in argv[:end] if not a.startswith("-")), None)  # the top level takes no values
    parser = build_parser(verb if verb in VERBS else None)
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(argv)
    shown = warnings.showwarning
    if not debug:
        warnings.showwarning = _one_line_warning
    try:
        return int(args.func(args) or 0)
    except EdgeloraError as exc:
        if debug:
            raise
        print(f"edgelora: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgelora: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug or an environment failure: one line, the traceback on request
        if debug:
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        print(f"edgelora: error: unexpected {type(exc).__name__}{': ' + first if first else ''}; "
              "run with --debug for the traceback", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = shown

