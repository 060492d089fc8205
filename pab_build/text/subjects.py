"""The subject filter: does an OOPS! caption describe a person? (paper 3.2)

Paper 3.2: "before image generation, we filter the captions to ensure they describe human
subjects. For each caption, we extract the subject and verify if it refers to a person, such as
people, he, man, etc."

The subject comes from the annotation's subject-verb-object triples (``kgoalsvos`` /
``kwentwrongsvos``) when they name one; otherwise from the caption itself: the head noun of the
first noun phrase before the main verb (see :func:`analyse_subject`). Whether it refers to a
person: see :func:`is_person_word` (config words, lexicon file, WordNet, agent nouns, compounds). A compound subject ("a man and his dog") is a person when any of its
heads is one; a group word takes its ``of`` complement ("a group of people"). Captions with no
subject ("trying to jump the fence") and junk ("Don't know") are rejected: nothing to verify.

Names are people: the caption keeps its original case, and a capitalised word that is no common
noun ("Sarah", "John") counts as one. Person nouns come from WordNet (hyponyms of person.n.01, see
:mod:`pab_build.text.wordnet`) and from the versioned lexicon file ``data/subject_lexicon.txt``.
The word classes and the person rules are :mod:`pab_build.text.words`; this module is the parser.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from .words import (ARTICLES, AUXILIARIES, CLAUSE_WORDS, DETERMINERS, DISCOURSE, GOAL_WORDS, IRREGULAR_VERB_FORMS,
                    NOT_ADVERB_LY, NOUN_ING, PARTITIVES, PERSON_NOUNS, PERSON_PRONOUNS, POSSESSIVES,
                    PREPOSITIONS, PRONOUN_DETERMINERS, PRONOUN_PLACEHOLDERS, PUNCT,
                    START_PREPOSITIONS, SUBORDINATORS, THING_PRONOUNS, VERB_FORMS, VIDEO_LINKS,
                    VIDEO_WORDS, REFERRING_PRONOUNS, _JUNK_RE, _TOKEN_RE, caption_names, is_person_word,
                    refers_back_to_a_person, is_unknown_word)


# -- finding the subject --------------------------------------------------------------------------
@dataclass(frozen=True)
class SubjectResult:
    subject: str | None  # the head word(s): "man", "man and son", "people"
    is_person: bool
    problem: str | None  # why the caption is not kept (None when is_person)


def tokenize(caption: str) -> list[str]:
    """Lower-case words and punctuation; ``'s`` / ``'re`` split off (``man's`` -> ``man 's``)."""
    text = caption.lower().replace("\u2019", "'").replace("\u2018", "'")
    out: list[str] = []
    for tok in _TOKEN_RE.findall(text):
        m = re.fullmatch(r"(.+?)('s|'re|'m|'ve|'ll|'d|')", tok)
        if m and tok not in ("'",):
            out += [m.group(1), "'s" if m.group(2) == "'" else m.group(2)]
        else:
            out.append(tok)
    return out


def is_junk(caption: str) -> bool:
    """Answers like "Don't know", "n/a", "???" that describe nothing."""
    norm = " ".join(re.sub(r"[^a-z0-9' ]+", " ", caption.lower().replace("\u2019", "'")).split())
    return not norm or bool(_JUNK_RE.fullmatch(norm))


def _is_verbish(tok: str) -> bool:
    return tok in VERB_FORMS or tok in AUXILIARIES


def _is_ly_adverb(tok: str) -> bool:
    return tok.endswith("ly") and len(tok) > 4 and tok not in NOT_ADVERB_LY and tok not in PERSON_NOUNS


def _looks_like_verb(tok: str) -> bool:
    """Unknown ``-ing`` / ``-ed`` words after a noun: participles ("the man wearing a hat")."""
    return len(tok) > 5 and tok.endswith(("ing", "ed")) and tok not in NOUN_ING


def _ends_phrase(tok: str) -> bool:
    return tok in PREPOSITIONS or tok in CLAUSE_WORDS or tok in PUNCT or tok in AUXILIARIES


class _Parser:
    def __init__(self, toks: list[str], lex: tuple[set[str], set[str]]):
        self.toks, self.lex = toks, lex

    def at(self, i: int) -> str:
        return self.toks[i] if 0 <= i < len(self.toks) else ""

    def person(self, word: str) -> bool:
        return is_person_word(word, *self.lex)

    def noun_phrase(self, i: int) -> tuple[list[str], int]:
        """Head(s) of the noun phrase starting at ``i`` and the index after it."""
        cands: list[str] = []
        pre: list[str] = []
        while i < len(self.toks):
            t = self.at(i)
            if not cands and (t in PERSON_PRONOUNS or t == "it") and t not in POSSESSIVES:
                return [t], i + 1
            if t == "of":
                last = cands[-1] if cands else (pre[-1] if pre else "")
                if last in PARTITIVES:
                    return self.noun_phrase(i + 1)
                break
            if t == "'s":
                nxt = self.at(i + 1)
                # "'s" is "is"/"has" before a participle or an article; a base verb never follows it
                participle = nxt.endswith(("ing", "ed", "en")) and (nxt in VERB_FORMS or _looks_like_verb(nxt))
                aux = (not cands or participle or nxt in AUXILIARIES or nxt in IRREGULAR_VERB_FORMS
                       or nxt in ("a", "an", "the"))
                if aux:
                    break
                pre, cands = pre + cands + [t], []  # possessive: "the man's hat" -> the head is "hat"
                i += 1
                continue
            if not cands and (t in DETERMINERS or t.isdigit()):
                pre.append(t)
                i += 1
                continue
            if cands and (t in DETERMINERS or t in THING_PRONOUNS or t in PERSON_PRONOUNS):
                # "the man yeets the ball": an unknown word followed by an article was a verb
                if t in ARTICLES and len(cands) >= 2 and not self.person(cands[-1]):
                    cands.pop()
                break
            if not cands and pre and pre[-1] in PRONOUN_DETERMINERS and (_is_verbish(t) or _ends_phrase(t)):
                break  # "that hits the car", "both fall": the determiner is the subject
            if _ends_phrase(t) and (cands or t not in self.lex[0]):  # "Will tries": a name, not the modal
                break
            if cands and (_is_verbish(t) or _is_ly_adverb(t) or (_looks_like_verb(t) and not self.person(t))):
                nxt = self.at(i + 1)
                # "the soccer coach falls": a person noun that is also a verb, followed by the verb;
                # at the end it is the verb ("the hammock rips": WordNet's "rip" is also a rake)
                if not (self.person(t) and _is_verbish(nxt)):
                    break
            cands.append(t)
            i += 1
        if len(cands) >= 2 and cands[-1].endswith("s") and is_unknown_word(cands[-1]) and self.person(cands[-2]):
            return [cands[-2]], i  # "a wakeboarder faceplants into": an unknown -s word after a person is a verb
        if cands:
            return [cands[-1]], i
        return ([pre[-1]] if pre and pre[-1] != "'s" else []), i

    def subject(self, i: int) -> list[str]:
        heads, j = self.noun_phrase(i)
        while heads and self.at(j) in ("and", "or", "&", "plus"):
            nxt = self.at(j + 1)
            if not nxt or (_is_verbish(nxt) and not self.person(nxt) and nxt not in DETERMINERS):
                break
            more, j = self.noun_phrase(j + 1)
            if not more:
                break
            heads += more
        return heads

    def skip_phrase(self, i: int) -> int:
        """Past a prepositional object or participle phrase ("in the video", "riding a bike")."""
        if _is_verbish(self.at(i)) or _looks_like_verb(self.at(i)):
            i += 1
        seen = False
        while i < len(self.toks):
            t = self.at(i)
            if seen and (t in DETERMINERS or t in PERSON_PRONOUNS or t in THING_PRONOUNS):
                return i
            if t in PUNCT or t in CLAUSE_WORDS or t in AUXILIARIES:
                return i
            seen = seen or t not in DETERMINERS
            i += 1
        return i

    def start(self) -> int | None:
        """Index where the subject phrase begins, past openers; None when there is no subject."""
        i, n = 0, len(self.toks)
        while i < n:
            t, nxt = self.at(i), self.at(i + 1)
            if t in PUNCT or t in DISCOURSE or (_is_ly_adverb(t) and not self.person(t)):
                i += 1
            elif t == "there" and nxt in ("is", "are", "was", "were", "'s", "seems", "appears"):
                i += 2
                while self.at(i) in ("to", "be", "seems", "seem"):
                    i += 1
            elif (t in VIDEO_WORDS and nxt in VIDEO_LINKS) or (
                    t in ("the", "this", "a", "in") and nxt in VIDEO_WORDS and self.at(i + 2) in VIDEO_LINKS):
                i += 2 if t in VIDEO_WORDS else 3
                while self.at(i) in VIDEO_LINKS or self.at(i) in ("is", "was", "that", "how"):
                    i += 1
            elif (t in GOAL_WORDS or (t in DETERMINERS and nxt in GOAL_WORDS)) and (
                    self.at(i + 1 if t in GOAL_WORDS else i + 2) in ("is", "was", "'s", "seems", "seemed", "were")):
                i += 2 if t in GOAL_WORDS else 3
                if self.at(i) == "for":
                    return i + 1
                return None  # "the goal was to jump": no one named
            elif t in SUBORDINATORS or t in START_PREPOSITIONS:
                if "," in self.toks[i:]:
                    i = self.toks.index(",", i) + 1
                elif t in SUBORDINATORS and not (_is_verbish(nxt) or _looks_like_verb(nxt)):
                    i += 1  # "when he jumps ...": the clause's own subject
                elif nxt in PERSON_PRONOUNS and nxt not in POSSESSIVES:
                    i += 1  # "after he jumps he falls"
                else:
                    i = self.skip_phrase(i + 1)
            else:
                break
        if i >= n:
            return None
        t, nxt = self.at(i), self.at(i + 1)
        if t == "to" or (t in AUXILIARIES and t not in DETERMINERS and t not in self.lex[0]):  # "Will tries": a name
            return None
        starts_with_verb = (_is_verbish(t) or _looks_like_verb(t)) and not self.person(t)
        if starts_with_verb and (not nxt or nxt in DETERMINERS or nxt in PREPOSITIONS or _ends_phrase(nxt)
                                 or _is_verbish(nxt) or nxt in THING_PRONOUNS or nxt in PERSON_PRONOUNS):
            return None  # "riding a bike down the hill", "falls off the swing"
        return i


def _svo_subject(svos: list | None) -> str | None:
    for triple in svos or []:
        if isinstance(triple, (list, tuple)) and triple and isinstance(triple[0], str) and triple[0].strip():
            return " ".join(triple[0].lower().split())
    return None


def analyse_subject(caption: str, svos: list | None = None, extra_person: Iterable[str] = (),
                    extra_non_person: Iterable[str] = ()) -> SubjectResult:
    """The caption's subject and whether it refers to a person, with the reason when it is not kept.
    ``caption`` in its original case: capitalised names are people."""
    caption = caption or ""
    lex = (set(w.lower() for w in extra_person) | caption_names(caption), set(w.lower() for w in extra_non_person))
    if not caption.strip():
        return SubjectResult(None, False, "empty caption")
    if is_junk(caption):
        return SubjectResult(None, False, f"no usable caption: {caption.strip()[:80]!r}")
    svo = _svo_subject(svos)
    heads: list[str] = []
    if svo is not None and svo not in PRONOUN_PLACEHOLDERS and svo.split()[-1] not in PARTITIVES:
        heads = [svo.split()[-1]]  # the annotation's own parse; "-PRON-" and group words need the text
    else:
        parser = _Parser(tokenize(caption), lex)
        start = parser.start()
        if start is not None:
            heads = parser.subject(start)
    if not heads:
        return SubjectResult(None, False, "no subject found (the caption starts with a verb or names no one)")
    subject = " and ".join(heads)
    if any(is_person_word(h, *lex) for h in heads):
        return SubjectResult(subject, True, None)
    later = tokenize(caption)[1:]
    if REFERRING_PRONOUNS & set(later) and any(
            refers_back_to_a_person(h) for h in heads if h not in lex[1]):
        return SubjectResult(subject, True, None)  # "the streamer falls off his chair"
    return SubjectResult(subject, False, f"subject {subject!r} is not a person")


def find_subject(caption: str, svos: list | None = None) -> str | None:
    """The subject head word(s) of a caption ("man", "man and son"), or None when there is none."""
    return analyse_subject(caption, svos).subject


def is_person_subject(caption: str, svos: list | None = None) -> bool:
    """Paper 3.2's filter: whether the caption's subject refers to a person."""
    return analyse_subject(caption, svos).is_person
