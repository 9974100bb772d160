"""Evaluation: accuracy of zero-shot, k-shot ICL, M2IV and the baselines, side by side.

Answers are generated greedily (``model.generate``; steered through :func:`m2iv.patch_model`
for vector methods), cut at the prompt format's stop strings, and scored by a pluggable metric:
the default :func:`exact_match` compares after the usual VQA answer normalisation
(:func:`vqa_normalize`: lower case, punctuation, articles, number words, contractions). A
metric is any ``f(prediction, answer) -> float``.

:func:`compare` returns a JSON-ready dict; :func:`format_table` renders it as a Markdown table.
Each row also reports the mean prompt length in tokens (what the vectors save) and, for
vector methods, the held-out KL to the k-shot teacher when asked.
"""
from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Sequence

import torch

from ..data import Item, TaskData, load_task
from ..families import module_device, module_dtype
from ..patch import patch_model
from ..prompts import PromptBuilder, make_prompt_builder
from ..vectors import M2IV
from .sampling import Sampler

__all__ = ["vqa_normalize", "exact_match", "generate_answers", "accuracy", "compare",
           "format_table", "query_digest"]

# ------------------------------------------------------------------------- normalisation
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Im": "I'm", "im": "i'm",
    "ive": "i've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "lets": "let's",
    "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "shant": "shan't", "shed": "she'd", "shes": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "thats": "that's", "thered": "there'd",
    "theres": "there's", "theyd": "they'd", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "wasnt": "wasn't", "wed": "we'd", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "yall": "y'all",
    "youd": "you'd", "youll": "you'll", "youre": "you're", "youve": "you've"}
_PUNCT = set(";/[]\"{}()=+\\_-><@`,?!*#%^&$:|~")
_NUM_COMMA = re.compile(r"(?<=\d),(?=\d)")  # 1,000 -> 1000
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")  # a period that is not a decimal point


def vqa_normalize(text: str) -> str:
    """The usual VQA answer normalisation.

    Lower case; whitespace collapsed; thousands separators removed; punctuation removed where
    it touches a space or the ends, replaced by a space inside a word (``"t-shirt"`` ->
    ``"t shirt"``); periods removed except decimal points; number words ``zero`` .. ``ten``
    (and ``none``) to digits; articles dropped; common contractions restored.
    """
    s = " ".join(str(text).replace("\n", " ").replace("\t", " ").lower().split())
    s = _NUM_COMMA.sub("", s)
    out = []
    for i, ch in enumerate(s):
        if ch in _PUNCT:
            prev = s[i - 1] if i > 0 else " "
            nxt = s[i + 1] if i + 1 < len(s) else " "
            out.append("" if prev == " " or nxt == " " else " ")
        else:
            out.append(ch)
    s = _PERIOD.sub("", "".join(out))
    words = []
    for w in s.split():
        w = _NUMBERS.get(w, w)
        if w in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def exact_match(prediction: str, answer: str,
                normalize: Callable[[str], str] = vqa_normalize) -> float:
    """1.0 if the normalised prediction equals the normalised answer, else 0.0."""
    return float(normalize(prediction) == normalize(answer))


# ------------------------------------------------------------------------- generation
@torch.no_grad()
def generate_answers(model, builder: PromptBuilder, queries: Sequence[Item],
                     demos: Sequence[Sequence[Item]] | None = None, *,
                     max_new_tokens: int | None = None, batch_size: int = 8) -> list[str]:
    """Greedy answers of ``model`` (steered if it is patched) to the prompts."""
    dev, dt = module_device(model), module_dtype(model)
    out: list[str] = []
    kw = dict(builder.generate_kwargs())
    if max_new_tokens is not None:
        kw["max_new_tokens"] = max_new_tokens
    kw.setdefault("max_new_tokens", 16)
    for s in range(0, len(queries), batch_size):
        q = list(queries[s:s + batch_size])
        d = None if demos is None else list(demos[s:s + batch_size])
        enc = builder.encode(q, d, with_answer=False).to(dev, dt)
        T = enc.inputs["input_ids"].shape[1]
        gen = model.generate(**enc.inputs, do_sample=False, **kw)
        for row in gen[:, T:].tolist():
            stops = set(builder.stop_token_ids)
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            row = [t for t in row[:cut] if t != builder.pad_token_id]
            out.append(builder.clean_generation(builder.decode(row)))
    return out


def accuracy(predictions: Sequence[str], queries: Sequence[Item],
             metric: Callable[[str, str], float] = exact_match) -> float:
    if not queries:
        return float("nan")
    return sum(metric(p, q.answer) for p, q in zip(predictions, queries)) / len(queries)


def _prompt_tokens(builder, queries, demos) -> float:
    enc = builder.encode(list(queries[:8]), None if demos is None else list(demos[:8]),
                         with_answer=False)
    return float(enc.inputs["attention_mask"].sum(1).float().mean())


# ------------------------------------------------------------------------- comparison
@torch.no_grad()
def compare(model, data, builder: PromptBuilder | None = None, *, processor=None,
            vectors: dict[str, M2IV] | None = None, ks: Sequence[int] = (0, 1, 2, 4),
            pool_size: int | None = None, eval_queries: int | None = None, seed: int = 0,
            metric: Callable[[str, str], float] = exact_match,
            max_new_tokens: int | None = None, batch_size: int = 8,
            positions: str = "all", backend: str = "auto", strength: float = 1.0,
            kl_shots: int | None = None, balanced: bool = False, cache_dir: str | None = None,
            keep_predictions: bool = False) -> dict:
    """Accuracy on the ``eval`` split of: ICL for every k in ``ks`` (k = 0 is zero-shot;
    demonstrations sampled per query from the pool, class-balanced over the answers with
    ``balanced``) and zero-shot + each of ``vectors``, all on the same queries
    (``query_digest`` identifies them: equal digests, identical query lists).

    ``kl_shots``: also report each vector method's (and zero-shot's) held-out KL to the
    ``kl_shots``-shot teacher (averaged over the default number of demonstration sets; its
    outputs cached in ``cache_dir`` if given).
    Returns ``{"task", "n", "query_digest", "rows": [{"method", "shots", "accuracy",
    "prompt_tokens", ...}], ...}``.
    """
    data: TaskData = load_task(data)
    data.require_splits("pool", "eval")
    builder = builder or make_prompt_builder(model, processor)
    k_max = max([k for k in ks] + [kl_shots or 0, 1])
    sampler = Sampler(data, k_max, pool_size, seed=seed, eval_queries=eval_queries)
    queries = sampler.eval
    rows = []
    preds: dict[str, list[str]] = {}
    t0 = time.time()
    for k in ks:
        demos = (sampler.demos(queries, k, f"eval-icl-{k}", balanced=balanced) if k > 0
                 else None)
        p = generate_answers(model, builder, queries, demos, max_new_tokens=max_new_tokens,
                             batch_size=batch_size)
        name = ("zero-shot" if k == 0
                else f"ICL {k}-shot" + (" (balanced)" if balanced else ""))
        preds[name] = p
        rows.append({"method": name, "shots": k, "accuracy": accuracy(p, queries, metric),
                     "prompt_tokens": _prompt_tokens(builder, queries, demos)})
    zs_tokens = _prompt_tokens(builder, queries, None)
    for name, v in (vectors or {}).items():
        with patch_model(model, v.to(module_device(model)), positions=positions,
                         backend=backend, strength=strength):
            p = generate_answers(model, builder, queries, None, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size)
        preds[name] = p
        rows.append({"method": name, "shots": 0, "accuracy": accuracy(p, queries, metric),
                     "prompt_tokens": zs_tokens, "vector_shots": v.meta.get("shots"),
                     "vector_method": v.meta.get("method")})
    if kl_shots:
        from .distill import Distiller

        d = Distiller(model, data, builder, shots=kl_shots, pool_size=pool_size, steps=0,
                      seed=seed, eval_queries=eval_queries, eval_every=0, progress=False,
                      synergy_weight=0.0, positions=positions, backend=backend,
                      cache_dir=cache_dir)
        try:
            for row in rows:
                if row["method"] == "zero-shot":
                    row["kl"] = d.evaluate(None)["kl"]
                elif row["method"] in (vectors or {}):
                    row["kl"] = d.evaluate(vectors[row["method"]], strength=strength)["kl"]
        finally:
            d.close()
    out = {"task": data.name, "n": len(queries), "query_digest": query_digest(queries),
           "metric": getattr(metric, "__name__", "metric"),
           "pool_size": len(sampler.pool), "seed": seed, "kl_shots": kl_shots, "rows": rows,
           "seconds": round(time.time() - t0, 2)}
    if keep_predictions:
        out["predictions"] = {n: dict(zip([q.id for q in queries], p)) for n, p in preds.items()}
    return out


def query_digest(queries: Sequence[Item]) -> str:
    """A short digest of a query list (ids and contents, in order): two evaluations scored the
    same queries iff their digests are equal."""
    h = hashlib.sha256()
    for q in queries:
        h.update(str(q.id).encode() + b"\x00" + q.fingerprint())
    return h.hexdigest()[:16]


def format_table(result: dict) -> str:
    """A Markdown table of :func:`compare`'s result."""
    has_kl = any("kl" in r for r in result["rows"])
    head = "| method | shots in prompt | accuracy | prompt tokens |" + (" KL to teacher |"
                                                                       if has_kl else "")
    sep = "|---|---:|---:|---:|" + ("---:|" if has_kl else "")
    lines = [f"Task {result['task']}: {result['n']} eval queries, {result['metric']}", "",
             head, sep]
    for r in result["rows"]:
        kl = ""
        if has_kl:
            kl = f" {r['kl']:.4f} |" if "kl" in r else " |"
        lines.append(f"| {r['method']} | {r['shots']} | {100 * r['accuracy']:.1f} | "
                     f"{r['prompt_tokens']:.0f} |{kl}")
    return "\n".join(lines)
