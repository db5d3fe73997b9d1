"""`edgelora generate`: run a decoder bundle on a prompt, or hold a chat, streaming the reply to stdout.

Self-contained verb (`add_arguments`, `command`) over `edgelora.runtime`; imports no torch. With a chat
template in the bundle a `--prompt` is sent as the user's message (after `--system`, if given); `--raw`
sends the text as it is.
"""

from __future__ import annotations

import argparse
import sys

from edgelora.cli.common import as_flags
from edgelora.errors import EdgeloraError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Generate text with a decoder bundle (`edgelora export` of a causal LM), streamed to stdout. "
                     "--chat reads one message per line from stdin and keeps the conversation; an empty line or "
                     "end of input ends it.")
    p.add_argument("bundle", help="decoder bundle directory")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the text to answer")
    what.add_argument("--chat", action="store_true", help="interactive: messages from stdin, one per line")
    p.add_argument("--system", default=None, help="a system message put before the conversation")
    p.add_argument("--raw", action="store_true", help="send --prompt as plain text, without the chat template")
    p.add_argument("--adapter", default=None, help="the adapter (in a merged bundle: the one baked in)")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="most tokens per reply")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0: greedy (default); >0 samples")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (1: off)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the K likeliest tokens (0: off)")
    p.add_argument("--stop", nargs="+", action="extend", default=[], metavar="S",
                   help="strings that end a reply (not printed)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed: the same seed gives the same text")
    p.add_argument("--truncate", action="store_true",
                   help="cut a prompt longer than the context from the left instead of refusing it")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: physical cores)")


def _emit(pieces) -> str:
    text = []
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
        text.append(piece)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(text)


# The generator's parameters as the flags that set them, for its one-line errors.
PHRASES = {"pass truncate=True": "pass --truncate"}


def command(args: argparse.Namespace) -> int:
    """`edgelora generate`: streams the reply (or a conversation, with --chat) to stdout."""
    with as_flags({"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_p": "--top-p",
                   "top_k": "--top-k", "seed": "--seed"}, PHRASES):
        return _command(args)


def _command(args: argparse.Namespace) -> int:
    from edgelora.runtime import Runtime

    if args.raw and (args.chat or args.system is not None):
        raise EdgeloraError("--raw sends --prompt as plain text; --chat and --system need the chat template")
    generator = Runtime(args.bundle, intra_op_threads=args.threads).generator()
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, stop=args.stop, seed=args.seed, truncate=args.truncate)
    templated = generator.chat_template is not None and not args.raw
    if (args.chat or args.system is not None) and not templated:
        raise EdgeloraError(f"{args.bundle}: the bundle has no chat template, so --chat and --system cannot be "
                            "used; pass --prompt alone")
    messages = [{"role": "system", "content": args.system}] if args.system is not None else []
    if not args.chat:
        prompt = messages + [{"role": "user", "content": args.prompt}] if templated else args.prompt
        _emit(generator.stream(prompt, args.adapter, **options))
        return 0
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line.strip():  # end of input, or an empty line
            return 0
        messages.append({"role": "user", "content": line.rstrip("\n")})
        reply = _emit(generator.stream(messages, args.adapter, **options))
        messages.append({"role": "assistant", "content": reply})
