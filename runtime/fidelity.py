"""Fidelity beside speed: how far a candidate's outputs are from an fp32 reference of the same function.

The bench harness (`edgelora.runtime.bench`) runs every worker on the same inputs after timing; this module
says which bundle is whose reference (same base fingerprint, adapter, labels and source weights), which
pairs to report as speed-ups, and the per-row figures: worst and mean cosine, max abs diff, the share of
rows whose label agrees with the reference's (what a classifier's user reads), accuracy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

GENERATED_ROWS, GENERATED_SEQ = 32, 16  # fidelity inputs of a model without a tokenizer: rows x tokens of ids
OUTPUTS = ("logits", "embeddings")  # compared outputs, in order of preference for the headline figure

# Fidelity inputs: varied real English (questions, commands, news, reviews, one word, one long line).
# Deliberately not exporters/mixed_precision.py's CALIBRATION_TEXTS, which choose the fp32 layers: a
# figure measured on the sentences that tuned the export would flatter it.
FIDELITY_TEXTS = (
    "The cat sat quietly on the windowsill, watching the rain.",
    "Can you recommend a good Italian restaurant near the station?",
    "Interest rates rose for the third time this year.",
    "My flight to Chicago was cancelled because of the snowstorm.",
    "Photosynthesis converts light energy into chemical energy.",
    "Please turn off the lights in the living room.",
    "The committee will publish its final report next Tuesday.",
    "I absolutely loved the ending of that movie!",
    "This product broke after two days and support never answered.",
    "How do I reset my password if I no longer have access to my email?",
    "The museum is closed on Mondays and public holidays.",
    "She finished the marathon in just under four hours.",
    "Add two cups of flour and stir until the batter is smooth.",
    "The new firmware update fixes a bug in the Bluetooth driver.",
    "What time does the pharmacy open tomorrow morning?",
    "The defendant pleaded not guilty to all charges.",
    "Our quarterly revenue exceeded analyst expectations by twelve percent.",
    "A strong earthquake struck off the coast early on Sunday.",
    "Set an alarm for six thirty.",
    "The orchestra performed Beethoven's ninth symphony to a sold-out hall.",
    "Children under twelve must be accompanied by an adult.",
    "He apologized for the misunderstanding and offered a full refund.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The hiking trail is steep, rocky and poorly marked in places.",
    "I'm not sure whether I locked the front door.",
    "The senator announced she would not seek re-election.",
    "Transfer five hundred dollars from my savings to my checking account.",
    "The quarterback threw for three touchdowns in the second half.",
    "Researchers identified a protein that slows tumour growth in mice.",
    "This hotel room smelled of smoke and the sheets were stained.",
    "Could you translate this paragraph into Spanish?",
    "The bridge will be closed for repairs until the end of May.",
    "Honestly, the service was slow but the food made up for it.",
    "Neural networks learn representations from large amounts of data.",
    "The library extended its opening hours during exam season.",
    "Please remind me to call my grandmother on Sunday.",
    "The company recalled thousands of cars over a braking defect.",
    "A gentle breeze carried the smell of fresh bread down the street.",
    "Is it going to rain in Seattle this weekend?",
    "The treaty was signed by twenty-seven countries in Lisbon.",
    "My package says delivered, but it isn't on my porch.",
    "Shakespeare wrote many of his sonnets during the plague years.",
    "The startup raised forty million dollars in its latest funding round.",
    "Keep the medicine out of reach of children and store below 25 degrees.",
    "What's the difference between a virus and a bacterium?",
    "The referee's decision sparked angry protests from the home fans.",
    "I would like to cancel my subscription, effective immediately.",
    "Glaciers in the Alps have lost more than half their volume since 1900.",
    "Play some relaxing jazz in the kitchen.",
    "The painting was sold at auction for a record price.",
    "ok",
    "Why won't my laptop connect to the office Wi-Fi after the update, even though my phone connects fine?",
)



def _same_function(a: Mapping, b: Mapping) -> bool:
    """Same base (by manifest fingerprint), same adapter and labels: the same function at any precision.

    Where both manifests record the adapter's source weights (sha256 of its safetensors file), they must
    match too: two versions of an adapter under one name are two functions.
    """
    same_source = a.get("source") is None or b.get("source") is None or a.get("source") == b.get("source")
    return a.get("base") is not None and a.get("base") == b.get("base") and a.get("task") == b.get("task") \
        and a.get("labels") == b.get("labels") and same_source


def speedup_pairs(bundles: Sequence[Mapping]) -> list[tuple[str, int, int]]:
    """(kind, baseline, candidate) pairs: int8 over fp32, and merged over switchable, like for like."""
    pairs = []
    for i, a in enumerate(bundles):
        for j, b in enumerate(bundles):
            same = _same_function(a, b)
            if same and a["mode"] == b["mode"] and (a["precision"], b["precision"]) == ("fp32", "int8"):
                pairs.append(("int8/fp32", i, j))
            if same and a["precision"] == b["precision"] and (a["mode"], b["mode"]) == ("switchable", "merged"):
                pairs.append(("merged/switchable", i, j))
    return pairs


def fp32_references(bundles: Sequence[Mapping]) -> list[int | None]:
    """Each bundle's fp32 reference in the run: itself when fp32, else an fp32 bundle of the same base,
    adapter and labels, preferably of the same mode; None where the run holds none."""
    refs: list[int | None] = []
    for i, b in enumerate(bundles):
        same = [j for j, r in enumerate(bundles) if r.get("precision") == "fp32" and _same_function(b, r)]
        if b.get("precision") == "fp32":
            refs.append(i)
        else:
            refs.append(next((j for j in same if bundles[j].get("mode") == b.get("mode")), same[0] if same else None))
    return refs


def compare_outputs(candidate: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                    names: Sequence[str] = OUTPUTS) -> dict[str, dict]:
    """Per output of `names` in both (same shape, not empty): worst and mean row cosine, max abs diff, worst row.

    Cosines are computed in float64; a row that is zero on both sides counts as identical (1.0), zero on
    one side only as orthogonal (0.0).
    """
    out = {}
    for name in names:
        if name not in candidate or name not in reference:
            continue
        a = np.asarray(candidate[name], np.float64)
        b = np.asarray(reference[name], np.float64)
        if a.shape != b.shape or a.size == 0:
            continue
        a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)  # (rows, features)
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            cos = (a * b).sum(1) / (na * nb)
        cos = np.where((na == 0) & (nb == 0), 1.0, np.where((na == 0) | (nb == 0), 0.0, cos))
        worst = int(np.argmin(cos))
        out[name] = {"worst_cosine": float(cos[worst]), "mean_cosine": float(cos.mean()),
                     "max_abs_diff": float(np.abs(a - b).max()), "worst_row": worst}
    return out


def label_agreement(candidate: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float | None:
    """Share of rows whose label (argmax of `logits`) is the reference's; None without logits on both sides.
    A token classifier's rows are its real tokens (`worker._fidelity_outputs`): the share of tokens.

    A logits cosine of 0.93 reads as alarming, yet every label may be unchanged: this says which.
    """
    a, b = candidate.get("logits"), reference.get("logits")
    if a is None or b is None:
        return None
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 2 or a.shape != b.shape or a.shape[1] == 0:
        return None
    return float(np.mean(a.argmax(1) == b.argmax(1)))


def accuracy(outputs: Mapping[str, np.ndarray], labels: Sequence[str],
             gold: Sequence[str]) -> tuple[float | None, str | None]:
    """Share of rows whose argmax label is the gold one; (None, why) where that cannot be measured."""
    logits = outputs.get("logits")
    if not labels or logits is None or np.asarray(logits).ndim != 2 or np.asarray(logits).shape[1] != len(labels):
        return None, "no task head"
    if np.asarray(logits).shape[0] != len(gold):
        return None, "one output row per token (a token classifier), one gold label per text"
    unknown = sorted(set(gold) - set(labels))
    if unknown:
        return None, f"data labels {unknown[:3]} are not the adapter's ({', '.join(labels)})"
    pred = np.asarray(labels)[np.argmax(np.asarray(logits), axis=1)]
    return float(np.mean(pred == np.asarray(gold))), None


def row_fidelity(i: int, ref: int | None, outs: dict, labels: Sequence[str], ref_label: str | None,
              gold: Sequence[str] | None, names: Sequence[str]) -> dict:
    """One candidate's fidelity entry at one batch size; outs[k] = (outputs, inputs kind) per candidate."""
    mine, inputs = outs[i]
    entry: dict = {"reference": ref, "reference_label": ref_label, "inputs": inputs,
                   "rows": int(next(iter(mine.values())).shape[0]), "output": None, "worst_cosine": None,
                   "mean_cosine": None, "max_abs_diff": None, "outputs": {}, "label_agreement": None,
                   "accuracy": None, "note": None}
    if gold is not None and inputs == "texts":
        entry["accuracy"], why = accuracy(mine, labels, gold)
        entry["accuracy_note"] = why
    if ref is None:
        entry["note"] = "no fp32 reference"
        return entry
    theirs, ref_inputs = outs[ref]
    if ref_inputs != inputs:
        entry["note"] = f"inputs differ from the reference's ({inputs} vs {ref_inputs})"
        return entry
    entry["outputs"] = compare_outputs(mine, theirs, names)
    entry["label_agreement"] = label_agreement(mine, theirs)
    if not entry["outputs"]:
        entry["note"] = "no output in common with the reference"
        return entry
    entry["output"] = next(n for n in names if n in entry["outputs"])  # the first of `names` both have
    entry.update({k: entry["outputs"][entry["output"]][k] for k in ("worst_cosine", "mean_cosine", "max_abs_diff")})
    return entry


# --- decoders: greedy agreement and perplexity beside speed --------------------------------------------------

# Plain-text prompts whose greedy continuations are compared token by token (decoder bundles and peers alike).
AGREEMENT_PROMPTS = (
    "The history of the printing press begins",
    "To make a cup of green tea, first",
    "The three largest planets in the solar system are",
    "Dear customer, we are sorry to inform you that",
    "In Python, a list comprehension is",
    "The weather forecast for tomorrow says",
    "Photosynthesis is the process by which",
    "Once upon a time, in a small village by the sea,",
)

# Held-out English for perplexity: written for this benchmark, in no training set of ours.
HELD_OUT_TEXTS = (
    "The library on the corner opens at nine in the morning. On weekdays it is quiet until noon, when students "
    "arrive with their laptops and the tables by the windows fill up first. The librarian keeps a list of new "
    "books on a board near the entrance.",
    "To replace a bicycle tire, release the brake, open the quick-release lever and pull the wheel out of the "
    "frame. Push one side of the tire over the rim with two levers, take out the old tube, and check the inside "
    "of the tire for glass or thorns before fitting the new one.",
    "The city council voted on Tuesday to extend the tram line to the airport. Construction is expected to "
    "start next spring and to last about three years, during which several bus routes will change.",
    "Bees communicate the direction of a food source with a dance. The angle of the dance relative to the "
    "vertical comb shows the angle between the sun and the flowers, and its length tells how far away they are.",
    "She opened the letter slowly, afraid of what it might say. Inside was a single photograph of the house "
    "where she had grown up, and on the back, in her father's handwriting, the date of the summer they left.",
    "A hash table stores values under keys. It computes an index from each key and keeps the value in a slot "
    "at that index; when two keys land on the same slot, the table resolves the collision by probing or chaining.",
)


def greedy_agreement(tokens: Sequence[Sequence[int]], reference: Sequence[Sequence[int]]) -> dict:
    """How far greedy continuations follow the reference's, prompt by prompt.

    `prefix_share`: mean over prompts of (tokens equal before the first divergence) / (reference length);
    `exact_share`: the share of prompts whose whole continuation equals the reference's; `first_divergence`:
    per prompt, the index of the first differing token (None where they never differ).
    """
    if len(tokens) != len(reference) or not reference:
        raise ValueError(f"greedy_agreement: {len(tokens)} continuations against {len(reference)} references")
    shares, exact, first = [], [], []
    for mine, ref in zip(tokens, reference):
        n = len(ref)
        same = next((k for k, (a, b) in enumerate(zip(mine, ref)) if a != b), min(len(mine), n))
        shares.append(same / n if n else 1.0)
        exact.append(list(mine) == list(ref))
        first.append(None if list(mine) == list(ref) else same)
    return {"prefix_share": float(np.mean(shares)), "exact_share": float(np.mean(exact)), "first_divergence": first}
