"""Word tags and entities from a token-classification bundle's per-token logits (no torch).

`Runtime.predict` calls `predict_entities` for bundles of task "token-classification": each text is cut into
words (`entities.words`), each word takes the softmax of its first sub-token's logits (the tokenizer's offsets
say which sub-token starts it), and BIO or plain tags merge into entities with character offsets.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgelora.errors import EdgeloraError
from edgelora.runtime.bundle import MANIFEST_FILE
from edgelora.runtime.entities import OUTSIDE, entity_spans, first_subtokens, words


def predict_entities(runtime, texts: list[str], per_row: Sequence[str | None], labels: dict, batch_size: int) -> list[dict]:
    """Per text {"words": [{"text", "start", "end", "label", "score"}], "entities": [{"label", "start", "end",
    "text", "score"}]}; a word truncation dropped is tagged "O" with score 0."""
    results: list[dict] = []
    for start in range(0, len(texts), batch_size):
        chunk, names = texts[start : start + batch_size], per_row[start : start + batch_size]
        if len(set(names)) == 1:
            logits = runtime.run(chunk, names[0])["logits"]
        else:
            logits = runtime.run(chunk, adapters=names)["logits"]
        encodings = runtime._tokenizer.encode_batch(chunk)
        for text, name, rows, enc in zip(chunk, names, logits, encodings):
            names_ = labels[name]
            if rows.ndim != 2 or rows.shape[-1] != len(names_):
                raise EdgeloraError(f"{runtime.bundle_dir / MANIFEST_FILE}: adapter {name!r} lists {len(names_)} "
                                    f"labels but model.onnx gives logits of shape {rows.shape}; re-export the bundle")
            spans = words(text)
            first = first_subtokens(enc.offsets, enc.special_tokens_mask, spans)
            z = np.exp(rows.astype(np.float64) - rows.max(-1, keepdims=True))
            p = z / z.sum(-1, keepdims=True)  # (seq, labels)
            tags, scores = [], []
            for token in first:
                best = int(p[token].argmax()) if token >= 0 else -1
                tags.append(names_[best] if best >= 0 else OUTSIDE)
                scores.append(float(p[token, best]) if best >= 0 else 0.0)
            results.append({
                "words": [{"text": text[a:b], "start": a, "end": b, "label": t, "score": s}
                          for (a, b), t, s in zip(spans, tags, scores)],
                "entities": entity_spans(text, spans, tags, scores),
            })
    return results
