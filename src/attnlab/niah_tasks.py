"""What each NIAH task hides and asks: the needles and question of the retrieval tasks
(:func:`needles`, phrased by :class:`attnlab.niah.Templates`), and the list of the
common-words task (:func:`build`).

Common-words extraction, RULER's aggregation task (Hsieh et al., 2024, arXiv:2404.06654,
"CWE"): the answer depends on counting over the whole context, not on finding one place.

A numbered list of words in which ``n`` common words appear :data:`COMMON` times each and
every other word at most :data:`RARE` times (RULER's 30 and 3); the question asks for the
``n`` most common, and the answer is correct when every common word is among the generated
words. Where RULER draws from an English word list, the words here are whole-word tokens of
the model's own vocabulary (4 to 10 lowercase letters after a space), so that each list
item is a fixed number of tokens and a prompt has exactly the requested length; what is
left below the length after the last whole item is newlines. The phrasing is RULER's.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

from attnlab.errors import UserError

COMMON, RARE = 30, 3
HEAD = (
    "Below is a numbered list of words. In these words, some appear more often than others."
    " Memorize the ones that appear most often."
)
QUESTION = (
    "\nQuestion: What are the {n} most common words in the above list?"
    " Answer: The top {n} words that appear most often in the list are:"
)
_WORD = re.compile(r"[a-z]{4,10}")

# Keys of the multi-needle tasks, as in RULER's word keys.
NAMES = tuple(
    "apple river lantern copper meadow falcon harbor violet granite thunder pepper glacier "
    "orchid compass saddle marble cactus beacon walnut comet anchor willow ember quartz".split()
)


def join_names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def needles(task: str, rng: np.random.Generator, n: int, t):
    """(template, value, name, asked) of each needle, and the question's text."""
    if task == "passkey":
        value = str(int(rng.integers(10_000, 100_000)))
        return [(t.passkey_needle, value, "", True)], t.passkey_question
    values = [str(v) for v in rng.choice(np.arange(10_000, 100_000), size=n, replace=False)]
    names = [str(x) for x in rng.choice(NAMES, size=n, replace=False)]
    if task == "multikey":  # n keys, one asked
        pairs = zip(values, names, strict=True)
        spec = [(t.needle, v, name, i == 0) for i, (v, name) in enumerate(pairs)]
        return spec, t.question_one.replace("{name}", names[0])
    if task == "multivalue":  # one key, n values, all asked
        spec = [(t.needle, v, names[0], True) for v in values]
        return spec, t.question_all.replace("{names}", names[0])
    if task == "multiquery":  # n keys, all asked
        spec = [(t.needle, v, name, True) for v, name in zip(values, names, strict=True)]
        return spec, t.question_all.replace("{names}", join_names(names))
    raise AssertionError(task)  # make_prompt checked it


@lru_cache(maxsize=4)
def _vocabulary(tokenizer) -> list[tuple[str, int]]:
    """(word, token id) of every whole-word token: a space, then 4-10 lowercase letters
    (once per tokenizer: decoding a 262k vocabulary takes a second)."""
    words = {}
    for tok_id in sorted(tokenizer.get_vocab().values()):
        text = tokenizer.decode([tok_id])
        if text.startswith(" ") and _WORD.fullmatch(text[1:]):
            words.setdefault(text[1:], tok_id)
    return sorted(words.items())


def build(tokenizer, length: int, n_words: int, rng: np.random.Generator):
    """The token ids of one prompt of exactly ``length`` tokens, the positions of the common
    words' tokens, and the common words (the key, space-separated)."""

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    head, tail = bos + ids(HEAD), ids(QUESTION.format(n=n_words))
    budget = length - len(head) - len(tail)
    numbers, used = [], 0
    while True:  # item i: "\n<i>." then the word's one token
        number = ids(f"\n{len(numbers) + 1}.")
        if used + len(number) + 1 > budget:
            break
        numbers.append(number)
        used += len(number) + 1
    vocab = _vocabulary(tokenizer)
    n_rare = -(-(len(numbers) - n_words * COMMON) // RARE)
    if len(numbers) < n_words * COMMON or n_rare + n_words > len(vocab):
        raise UserError(
            f"common_words: {length} tokens hold {len(numbers)} list items, fewer than the "
            f"{n_words} common words x {COMMON} (or the vocabulary's {len(vocab)} words run "
            "out); lengthen the prompt or lower niah.needles"
        )
    chosen = rng.choice(len(vocab), size=n_words + n_rare, replace=False)
    common, rare = chosen[:n_words], chosen[n_words:]
    items = np.concatenate([np.repeat(common, COMMON), np.tile(rare, RARE)])
    items = rng.permutation(items[: len(numbers)])  # the last rare word's copies cut to fit
    out, positions, asked = list(head), [], set(common.tolist())
    for number, word in zip(numbers, items, strict=True):
        out += number
        if word in asked:
            positions.append(len(out))
        out.append(vocab[word][1])
    out += ids("\n") * (budget - used) + tail
    if len(out) != length:  # a newline of more than one token
        raise UserError(f"common_words: this tokenizer cannot build a {length}-token list")
    return out, positions, " ".join(vocab[w][0] for w in common)


def found(text: str, words: list[str]) -> bool:
    """Every asked word is among the generated words."""
    said = set(re.findall(r"[a-z]+", text.lower()))
    return all(w in said for w in words)
