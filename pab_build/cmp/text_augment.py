"""Caption processing of the official CMP recipe: ``pre_caption`` and EDA (Wei & Zou 2019) with
WordNet synonyms when a WordNet database is installed (docs/CMP.md)."""

from __future__ import annotations

import functools
import logging
import random
import re
from typing import Callable

log = logging.getLogger(__name__)

_PUNCTUATION = re.compile(r"([,.'!?\"()*#:;~])")
# EDA's stop words are never replaced by synonyms (the list of Wei & Zou's eda.py, abridged to
# the words captions use)
_STOP_WORDS = frozenset("""i me my we our you your he him his she her it its they them their what which who this
that these those am is are was were be been being have has had do does did a an the and but if or because as
until while of at by for with about against between into through during before after above below to from up
down in out on off over under again then once here there when where why how all any both each few more most
other some such no nor not only own same so than too very s t can will just don should now""".split())


def pre_caption(caption: str, max_words: int) -> str:
    """The official ``pre_caption``: lower case, ``,.'!?"()*#:;~`` removed, ``-`` and ``/`` to
    spaces, ``<person>`` to person, spaces collapsed, at most ``max_words`` words."""
    text = _PUNCTUATION.sub("", caption.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
    return " ".join(text.split()[:max_words])


@functools.lru_cache(maxsize=1)
def wordnet_synonyms() -> Callable[[str], list[str]] | None:
    """WordNet synonyms through nltk (EDA's ``get_synonyms``), or None, with one warning, when no
    WordNet database is installed (NLTK_DATA/corpora/wordnet; see docs/CMP.md)."""
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
    except Exception as e:  # noqa: BLE001 - nltk missing or no database: EDA runs without synonyms
        log.warning("EDA without synonym replacement/insertion: no WordNet available (%s); the official "
                    "recipe uses WordNet synonyms (docs/CMP.md says how to install it offline)",
                    next((ln.strip() for ln in str(e).splitlines() if ln.strip().strip("*")), type(e).__name__))
        return None

    def synonyms(word: str) -> list[str]:
        found = set()
        for syn in wordnet.synsets(word):
            for lemma in syn.lemmas():
                name = lemma.name().replace("_", " ").replace("-", " ").lower()
                found.add("".join(ch for ch in name if ch in " abcdefghijklmnopqrstuvwxyz"))
        found.discard(word)
        return sorted(found)

    return synonyms


def eda(text: str, rng: random.Random, probability: float, alpha: float = 0.1,
        synonyms: Callable[[str], list[str]] | None = None) -> str:
    """One EDA edit (Wei & Zou 2019) with ``probability``, as the official ``eda(num_aug=1)``: one
    of synonym replacement, synonym insertion, random swap, random deletion, each on ~``alpha``
    of the words. Without ``synonyms`` (no WordNet) the first two become the insertion of a copy
    of a caption word."""
    words = text.split()
    if len(words) < 2 or rng.random() >= probability:
        return text
    n = max(1, int(alpha * len(words)))
    op = rng.choice(("replace", "insert", "swap", "delete") if synonyms else ("swap", "delete", "insert"))
    if op == "replace":
        replaced = 0
        for word in rng.sample(sorted(set(words) - _STOP_WORDS), len(set(words) - _STOP_WORDS)):
            options = synonyms(word)
            if options:
                new = rng.choice(options)
                words = [new if w == word else w for w in words]
                replaced += 1
            if replaced >= n:
                break
        return " ".join(" ".join(words).split())
    if op == "insert" and synonyms:
        for _ in range(n):
            for _ in range(10):
                options = synonyms(rng.choice(words))
                if options:
                    words.insert(rng.randrange(len(words)), options[0])
                    break
        return " ".join(" ".join(words).split())
    if op == "swap":
        for _ in range(n):
            i, j = rng.randrange(len(words)), rng.randrange(len(words))
            words[i], words[j] = words[j], words[i]
    elif op == "delete":
        kept = [w for w in words if rng.random() >= alpha]
        words = kept or [rng.choice(words)]
    else:
        for _ in range(n):
            words.insert(rng.randrange(len(words) + 1), rng.choice(words))
    return " ".join(words)
