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

# Plain-text prompts whose greedy continuations are compared token by token (decoder bundles and peers alike):
# 24 prompts, so that one prompt moves the agreement share by 4%, not 12%.
AGREEMENT_PROMPTS = (
    "The history of the printing press begins",
    "To make a cup of green tea, first",
    "The three largest planets in the solar system are",
    "Dear customer, we are sorry to inform you that",
    "In Python, a list comprehension is",
    "The weather forecast for tomorrow says",
    "Photosynthesis is the process by which",
    "Once upon a time, in a small village by the sea,",
    "The main reason bread goes stale is",
    "A good way to learn a new language is to",
    "The train to the coast leaves every hour, but",
    "In a spreadsheet, the SUM function",
    "The old lighthouse keeper had one rule:",
    "To reset your password, open the settings page and",
    "Volcanoes form where",
    "The recipe calls for two eggs, a cup of flour and",
    "When the power went out, the children",
    "A prime number is a whole number that",
    "The museum's newest exhibit shows",
    "Before planting tomatoes in the garden, you should",
    "The meeting was postponed because",
    "Rivers carry sediment from the mountains to",
    "The best thing about working from home is",
    "In the first chapter of the novel, the detective",
)

# Held-out English for perplexity: written for this benchmark, in no training set of ours. 41 texts, about 1,600
# scored SmolLM2 tokens; the first six alone (about 250) put an int8 bundle's perplexity ratio up to 1.6% away
# from all 41's. Even at 41 a ratio's 95% bootstrap interval over texts is about +-0.5% wide, so the bench
# reports the interval beside the ratio (`perplexity_ratio_interval`).
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
    "Our neighbour keeps three hens in a small coop behind the garage. Every morning she collects the eggs in "
    "a wire basket, and on Saturdays she leaves a dozen on our doorstep with a note asking us to return the "
    "carton.",
    "The river flooded twice last winter. After the second time, the town built a low wall along the bank and "
    "planted willows on the meadow downstream, where the water can spread out without reaching any houses.",
    "To boil an egg so that the yolk stays soft, lower it into water that is already boiling, wait six "
    "minutes, then move it straight into a bowl of cold water. Peel it under the tap, starting from the wide "
    "end.",
    "The committee reviewed forty applications for the grant and invited eight teams to present their plans. "
    "Each team had fifteen minutes to speak and ten minutes to answer questions from the panel.",
    "A compiler reads source code and turns it into instructions a machine can run. Before it writes any "
    "output, it checks that names are declared, that types match, and that every function returns a value.",
    "He had never driven in snow before. He kept both hands on the wheel, stayed well behind the truck in "
    "front, and was surprised to find that the slow, careful drive to the village took almost two hours.",
    "Coral reefs cover a tiny part of the ocean floor but shelter about a quarter of all marine species. When "
    "the water warms for too long, the corals lose the algae that feed them and turn white.",
    "The shop on the high street sells only buttons. There are thousands of them in wooden drawers, sorted by "
    "colour and size, and the owner can tell at a glance which drawer holds a match for the one you bring in.",
    "Please remember that the office will be closed on Monday for the public holiday. Urgent requests can be "
    "sent by email, and someone will read them on Tuesday morning before nine.",
    "Sound travels faster in water than in air, and faster still in steel. That is why a train can sometimes "
    "be heard through the rails before the noise of its engine reaches you across the fields.",
    "The recipe said to let the dough rest for an hour, but the kitchen was cold, so it barely rose. In the "
    "end she put the bowl near the radiator and waited most of the afternoon.",
    "Most birds that migrate at night use the stars to keep their course. Young birds learn the pattern of "
    "the sky around the pole star in their first weeks, long before they leave on their first journey south.",
    "When the results were announced, the hall went silent for a moment, and then everyone started talking at "
    "once. The youngest team had won, with a design that nobody had taken seriously in the first round.",
    "A budget is easier to keep when it is simple. Write down what comes in each month, what must go out, and "
    "what is left, then decide in advance how much of the rest you will save.",
    "The castle was built on a hill above the river in the twelfth century. Its walls were rebuilt twice "
    "after sieges, and the tower that still stands today dates from the second rebuilding.",
    "My grandmother wrote letters every Sunday afternoon. She used a fountain pen and blue paper, and she "
    "never began a new page without finishing the sentence on the old one.",
    "Good documentation explains why a piece of code exists, not only what it does. A reader who knows the "
    "reason for a decision can change the code safely when the reason no longer holds.",
    "The ferry was late because of the wind, and the passengers waited in the small cafe by the harbour, "
    "drinking tea and watching the grey waves break over the end of the pier.",
    "Muscles grow stronger when they are asked to do a little more than they are used to, and then given time "
    "to recover. Rest days are part of training, not a break from it.",
    "Before the meeting, read the two pages of notes that were sent round on Friday. We will not go through "
    "them again, and the discussion will start from the questions at the end.",
    "The first maps of the coast were drawn by sailors who measured the depth of the water with a weighted "
    "rope. Their charts were good enough to guide ships for more than a century.",
    "The team shipped the new version on Thursday evening. By Friday morning there were three bug reports, "
    "two of them about the same button, which had moved to the other side of the screen.",
    "In autumn the leaves change colour because the trees stop making chlorophyll. The green fades, and the "
    "yellow and orange pigments that were there all summer finally show.",
    "He took the job at the bakery because it started at four in the morning, which left his afternoons free "
    "for the piano. After a year he could play the whole of the sonata from memory.",
    "A thermostat measures the temperature of a room and switches the heating on when it falls below the "
    "setting. Turning the dial higher does not make the room warm up faster; it only changes where it stops.",
    "The town's market has been held in the same square every Wednesday for over four hundred years. Farmers "
    "still bring vegetables and cheese, but most stalls now sell clothes, tools and phone cases.",
    "To keep a houseplant healthy, water it when the top of the soil feels dry, not on a fixed day. Most "
    "plants that die indoors are given too much water rather than too little.",
    "The storm knocked down two trees on our street and left the whole district without power until the next "
    "evening. We cooked pasta on the camping stove and played cards by candlelight.",
    "An index in a database works like the index at the back of a book. Instead of reading every page, the "
    "system looks up the value and jumps to the rows that hold it.",
    "The orchestra rehearsed the symphony for six weeks. On the night of the concert the conductor dropped "
    "his baton in the second movement, and the musicians carried on without missing a beat.",
    "Glaciers move slowly downhill under their own weight, scraping the rock beneath them. The valleys they "
    "leave behind have a wide, rounded shape, unlike the narrow valleys that rivers cut.",
    "Thank you for your order. Your parcel left our warehouse this morning and should arrive within three "
    "working days. You can follow its progress with the tracking number below.",
    "She spent the summer cataloguing the letters in the attic: more than two hundred of them, written "
    "between two sisters who lived on opposite sides of the ocean for most of their lives.",
    "The simplest way to sort a short list by hand is to pick out the smallest item, put it first, and repeat "
    "with the rest. It is slow for long lists, but it is easy to check at every step.",
    "Every spring the swallows return to the barn and rebuild their nests under the same beams. The farmer "
    "leaves the top window open for them from April until the young have flown.",
)


def next_token_logprobs(logits: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    """Log-probabilities (float64) of ids[1:] from the logits of a prefill over `ids` ((len(ids), vocab) or with
    a leading batch of 1): row t, log-softmaxed in float64, scores token t + 1."""
    rows = np.asarray(logits)
    rows = rows[0] if rows.ndim == 3 else rows
    if rows.shape[0] != len(ids):
        raise ValueError(f"next_token_logprobs: {rows.shape[0]} logit rows for {len(ids)} ids")
    x = rows[:-1].astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return np.take_along_axis(logp, np.asarray(ids[1:], np.int64)[:, None], axis=1)[:, 0]


def pooled_perplexity(logprobs: Sequence[np.ndarray]) -> float:
    """exp of the mean negative log-likelihood over every scored token of every text (longer texts weigh more)."""
    count = sum(int(np.size(lp)) for lp in logprobs)
    if not count:
        raise ValueError("pooled_perplexity: no token was scored")
    return float(np.exp(-sum(float(np.sum(lp)) for lp in logprobs) / count))


def perplexity_ratio_interval(nll: Sequence[float], ref_nll: Sequence[float], tokens: Sequence[int],
                              level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """A paired bootstrap interval of a candidate's pooled perplexity over its reference's: texts are drawn with
    replacement (the same draw for both, as both scored the same texts), each draw's ratio pooled over its tokens;
    returns the central `level` share of the ratios. Per text: summed negative log-likelihood and scored tokens."""
    a, b, n = (np.asarray(v, np.float64) for v in (nll, ref_nll, tokens))
    if not (a.shape == b.shape == n.shape) or a.size == 0 or n.sum() <= 0:
        raise ValueError(f"perplexity_ratio_interval: {a.size}, {b.size} and {n.size} texts; pass one value per text")
    draws = np.random.default_rng(seed).integers(0, a.size, size=(resamples, a.size))
    ratios = np.exp((a[draws].sum(axis=1) - b[draws].sum(axis=1)) / n[draws].sum(axis=1))
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(ratios, [tail, 100 - tail])
    return float(lo), float(hi)


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
