"""`rlp-dist make-demo-data --out DIR`: a synthetic corpus on which thinking can help a tiny model.

The world: two fixed random maps over single-token symbols of the bundled tokenizer,

    g: X -> Y   (16 lowercase letters -> 16 uppercase letters)
    f: Y -> Z   (16 uppercase letters -> 9 digits),       a fact is   x = z   with   z = f(g(x)).

A fact's answer z needs two lookups; a thought that states the intermediate y = g(x) turns it into
one (z = f(y)). Documents are 24 facts with random x. Two formats:

    plain   ` x = z`                           (3 tokens per fact)
    worked  `<think></think> x<think></think> =<think> y</think> z`
            (10 tokens; before each token the RLP sequence context + <think> thought </think> x_t, exactly
            as the rollout builds it, with an empty thought where no computation is needed)

Splits (JSONL, field ``text``):
- ``warm.jsonl``: the NTP warm start, half worked and half plain documents. Worked documents cover
  all of X; their thoughts come from a noisy solver: y = g(x) with probability ``thought_accuracy``
  (default 0.3), else a uniformly random letter, and the answer is always f(y) of the thought written
  (the warm start learns f exactly, "the answer follows from the thought", but only a noisy g). Plain
  documents use only X_plain (4 of the 16 letters): the model learns the plain format, but never sees
  a plain fact x = z for the 12 letters of X_held, so without a thought it would have to compose g and
  f in one forward pass (it does not: it extrapolates the X_plain answers, confidently and wrongly,
  which the no-think NLL shows).
- ``rlp.jsonl``: plain documents over all of X (no thoughts): the RLP split.
- ``eval.jsonl``: held-out plain documents (another seed), with ``think_positions``: the token indices
  (in the document, bundled tokenizer) of the answers z of X_held facts: where a thought can help.
  ``rlp-dist eval --positions-key think_positions`` evaluates exactly there.
- ``meta.json``: the maps, the symbol sets and the options.

What RLP can learn: after the warm start a sampled thought is right only part of the time; the right
one makes z nearly certain, a wrong one makes another digit likely. The information-gain reward
S_pred - S_ema separates them, so RLP should raise the share of right thoughts and with it the gain at
``think_positions``; advantages shuffled within each step (``rlp.shuffle_advantages=true``) carry no
such signal (the control).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
from typing import Sequence

X = tuple("abcdefghijklmnop")  # ' a' .. ' p': single tokens of the bundled tokenizer
Y = tuple("ABCDEFGHILMNOPRS")  # ' A' .. ' S' (J, K, Q are not single tokens)
Z = tuple("012345678")  # ' 0' .. ' 8' (' 9' is not a single token)
N_PLAIN = 4  # X_plain: the letters whose true plain facts the warm start shows
FACTS_PER_DOC = 24


def make_world(seed: int) -> dict:
    rng = random.Random(seed)
    g = {x: rng.choice(Y) for x in X}
    f = {y: rng.choice(Z) for y in Y}
    xs = list(X)
    rng.shuffle(xs)
    return {"g": g, "f": f, "x_plain": sorted(xs[:N_PLAIN]), "x_held": sorted(xs[N_PLAIN:])}


def _worked_fact(rng: random.Random, world: dict, accuracy: float) -> str:
    x = rng.choice(X)
    y = world["g"][x] if rng.random() < accuracy else rng.choice(Y)
    # Empty thoughts before the tokens that need no computation (x is random, '=' is fixed): the warm
    # start learns when to think, so a thought drawn anywhere in the RLP split has a do-nothing option.
    return f"<think></think> {x}<think></think> =<think> {y}</think> {world['f'][y]}"


def plain_doc(rng: random.Random, world: dict, letters: Sequence[str] = X) -> tuple[str, list[int]]:
    """A plain document of true facts over ``letters`` and the token indices of its X_held answers
    (3 tokens per fact: x, =, z)."""
    parts, positions = [], []
    for i in range(FACTS_PER_DOC):
        x = rng.choice(letters)
        parts.append(f" {x} = {world['f'][world['g'][x]]}")
        if x in world["x_held"]:
            positions.append(3 * i + 2)
    return "".join(parts), positions


def warm_doc(rng: random.Random, world: dict, accuracy: float, worked: bool) -> str:
    """A warm-start document: all facts worked (noisy thought, answer f(thought)) over all of X, or all
    plain over X_plain. Whole documents switch format, so a context shows which one it is in."""
    if worked:
        return "".join(_worked_fact(rng, world, accuracy) for _ in range(FACTS_PER_DOC))
    return plain_doc(rng, world, world["x_plain"])[0]


def generate(out: str, seed: int = 0, warm_docs: int = 3000, rlp_docs: int = 3000, eval_docs: int = 200,
             thought_accuracy: float = 0.3) -> pathlib.Path:
    if not 0.0 <= thought_accuracy <= 1.0:
        raise ValueError(f"--thought-accuracy={thought_accuracy} must be in [0, 1]; the demo uses 0.3")
    for name, n in (("--warm-docs", warm_docs), ("--rlp-docs", rlp_docs), ("--eval-docs", eval_docs)):
        if n < 1:
            raise ValueError(f"{name}={n} must be >= 1")
    world = make_world(seed)
    d = pathlib.Path(out)
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + 1)
    with open(d / "warm.jsonl", "w") as fh:
        for i in range(warm_docs):
            fh.write(json.dumps({"text": warm_doc(rng, world, thought_accuracy, worked=i % 2 == 0)}) + "\n")
    with open(d / "rlp.jsonl", "w") as fh:
        for _ in range(rlp_docs):
            fh.write(json.dumps({"text": plain_doc(rng, world)[0]}) + "\n")
    rng_eval = random.Random(seed + 2)
    with open(d / "eval.jsonl", "w") as fh:
        for _ in range(eval_docs):
            text, pos = plain_doc(rng_eval, world)
            fh.write(json.dumps({"text": text, "think_positions": pos}) + "\n")
    meta = {"seed": seed, "thought_accuracy": thought_accuracy, "facts_per_doc": FACTS_PER_DOC, **world,
            "format": {"plain": " x = z", "worked": " x =<think> y</think> z"}}
    (d / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return d


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="directory to write warm.jsonl, rlp.jsonl, eval.jsonl, meta.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warm-docs", type=int, default=3000)
    p.add_argument("--rlp-docs", type=int, default=3000)
    p.add_argument("--eval-docs", type=int, default=200)
    p.add_argument("--thought-accuracy", type=float, default=0.3,
                   help="share of worked thoughts that state the right intermediate g(x)")


def run(args: argparse.Namespace) -> int:
    from rlp_dist.config.schema import ConfigError

    try:
        d = generate(args.out, args.seed, args.warm_docs, args.rlp_docs, args.eval_docs, args.thought_accuracy)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(f"wrote {d}/warm.jsonl, rlp.jsonl, eval.jsonl, meta.json")
    return 0


def right_intermediate_share(positions_jsonl: str, data_dir: str, tokenizer) -> dict:
    """How often an evaluated thought states the right intermediate: its first word equals g(x) for
    the fact's letter x (two tokens before the answer). Reads ``rlp-dist eval``'s positions.jsonl over
    DIR/eval.jsonl. {"right": share of thoughts, "distinct": distinct thought texts, "top": the most
    frequent thought}: a high gain with a low right share is a thought that does not carry g(x)."""
    from collections import Counter

    d = pathlib.Path(data_dir)
    g = json.loads((d / "meta.json").read_text())["g"]
    docs = [tokenizer.encode(json.loads(line)["text"], add_special_tokens=False)
            for line in (d / "eval.jsonl").read_text().splitlines() if line.strip()]
    right = total = 0
    texts: Counter = Counter()
    for line in pathlib.Path(positions_jsonl).read_text().splitlines():
        rec = json.loads(line)
        x = tokenizer.decode([docs[rec["document"]][rec["position"] - 2]]).strip()
        for text in rec["thoughts"]:
            words = text.split()
            right += bool(words) and words[0] == g.get(x)
            total += 1
            texts[text] += 1
    return {"right": right / max(total, 1), "distinct": len(texts), "top": texts.most_common(1)[0][0] if texts else ""}
