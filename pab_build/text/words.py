"""Word classes for the subject filter (paper 3.2): which words name a person.

The open word lists live in the versioned lexicon file ``data/subject_lexicon.txt``; the closed
classes (determiners, prepositions, auxiliaries, ...) are here, with the rules that decide whether a
word is a person: config words, lexicon, WordNet (:mod:`pab_build.text.wordnet`), agent nouns,
compounds, and capitalised names. The parser that finds the subject is :mod:`pab_build.text.subjects`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from . import wordnet


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# -- lexicon --------------------------------------------------------------------------------------
LEXICON_PATH = Path(__file__).parent.parent / "data" / "subject_lexicon.txt"


def load_lexicon(path: Path = LEXICON_PATH) -> dict[str, list[str]]:
    """``[section]`` -> its words, in file order (a list, so a test can see words listed twice)."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
        elif line:
            current.extend(line.split())
    return sections


_LEX = load_lexicon()
PERSON_NOUNS = frozenset(_LEX["person"])
NOT_PERSON = frozenset(_LEX["not_person"])
VERBS = frozenset(_LEX["verbs"])  # base forms: they end the subject phrase and make agent nouns
IRREGULAR_VERB_FORMS = frozenset(_LEX["irregular_verb_forms"])
IRREGULAR_PLURALS = dict(zip(_LEX["irregular_plurals"][::2], _LEX["irregular_plurals"][1::2]))

PERSON_PRONOUNS = _words("""
he she they i we you someone somebody everyone everybody anyone anybody him her them us me
himself herself themselves myself yourself ourselves yourselves whoever""")


THING_PRONOUNS = _words("it something everything anything nothing itself what this that these those")








# group words whose "of" complement is the real head ("a group of people", "one of them")
PARTITIVES = _words("""
group groups bunch couple pair lot lots team crowd number handful dozen dozens hundreds thousands
family gang crew band pack herd flock set line row kind type sort majority rest half member members
squad troop class swarm litter few some all both each many most several none any either neither
one two three four five six seven eight nine ten
""")


# person-word suffixes of compounds (fireman, cowboy, schoolgirl, landlady, boyfriend)
PERSON_SUFFIXES = ("man", "woman", "person", "boy", "girl", "guy", "lady", "mother", "father", "sister",
                   "brother", "daughter", "parent", "friend")






AUXILIARIES = _words("""
is are was were be been being am 's 're 'm 've 'd 'll has have had do does did can could will
would shall should may might must cannot can't won't don't doesn't didn't isn't aren't wasn't
weren't couldn't shouldn't wouldn't hasn't haven't hadn't not never almost nearly just also then
still suddenly accidentally finally immediately quickly slowly really already even only barely
""")


DETERMINERS = _words("""
a an the this that these those some any each every another other all both either neither no
many much several few more most such whole entire his her their my our your its whose one two
three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen twenty
dozens lots
""")


POSSESSIVES = _words("his her their my our your its whose")


ARTICLES = _words("a an the his her their my our your its")


PRONOUN_DETERMINERS = _words("this that these those one all both some each many several few most another either "
                             "neither")


PREPOSITIONS = _words("""
in on at with from near by behind under over above below into onto off of for to through across
along around inside outside without like as against beside besides next between beneath toward
towards up down out upon within about after before during past atop underneath via than
""")


CLAUSE_WORDS = _words("who whom whose which that where when while because but and or nor so yet if though although")


SUBORDINATORS = _words("when while as because since if although though once until whilst")


START_PREPOSITIONS = _words("in on at during after before upon inside outside near from under behind within "
                            "throughout despite with for by")


DISCOURSE = _words("""
so then and but suddenly unfortunately eventually finally basically apparently accidentally
immediately also just now first next later afterwards meanwhile ok okay well oh oops lol yes yeah
soon again here instead still
""")


VIDEO_WORDS = _words("video clip footage gif film movie scene")


VIDEO_LINKS = _words("shows showing of features featuring where")


GOAL_WORDS = _words("goal goals intention intent aim plan idea objective point purpose")


NOT_ADVERB_LY = _words("""elderly ugly lonely friendly curly silly jolly holy jelly belly family bully lily early
only daily burly rally trolley ally italy fly""")


NOUN_ING = _words("""ceiling building railing swing string ring wing king thing sibling offspring wedding pudding
evening morning clothing awning painting icing sling viking darling duckling seedling underling spring""")


PUNCT = _words(", ; : . ! ? ( ) & \" -")


PRONOUN_PLACEHOLDERS = _words("-pron- pron -PRON-")


# capitalised at a sentence start, never a name
_FUNCTION_WORDS = (DETERMINERS | PREPOSITIONS | AUXILIARIES | CLAUSE_WORDS | DISCOURSE | PERSON_PRONOUNS
                   | THING_PRONOUNS | SUBORDINATORS | START_PREPOSITIONS | VIDEO_WORDS | GOAL_WORDS)


_JUNK_RE = re.compile(
    r"(i )?(do not|don't|dont|didn't|didnt|did not) know.*|(i'?m |i am )?(not sure|unsure).*|no idea.*"
    r"|idk.*|dunno.*|n ?a|none|nothing( .*)?|unknown.*|unclear.*"
    r"|(i )?(can't|cant|cannot|could not|couldn't) (tell|see|say).*"
    r"|no (goal|failure|fail|problem|mistake).*|not applicable|same( as above)?|see above|skip|x+|none of the above"
)


_TOKEN_RE = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*'?|[,;:.!?()&\"]")


def _verb_forms(base: str) -> set[str]:
    forms = {base}
    cvc = len(base) >= 3 and base[-1] not in "aeiouwxy" and base[-2] in "aeiou" and base[-3] not in "aeiou"
    stem = base + base[-1] if cvc else base
    if base.endswith(("s", "sh", "ch", "x", "z", "o")):
        forms.add(base + "es")
    elif base.endswith("y") and base[-2:-1] not in ("a", "e", "i", "o", "u"):
        forms |= {base[:-1] + "ies", base[:-1] + "ied"}
    else:
        forms.add(base + "s")
    if base.endswith("e") and not base.endswith(("ee", "ye", "oe")):
        forms |= {base + "d", base[:-1] + "ing"}
    else:
        forms |= {base + "ed", base + "ing", stem + "ed", stem + "ing"}
    return forms


VERB_FORMS = frozenset(f for v in VERBS for f in _verb_forms(v)) | IRREGULAR_VERB_FORMS


# -- lexicon lookups ------------------------------------------------------------------------------
def _lemmas(word: str) -> list[str]:
    out = [word]
    if word in IRREGULAR_PLURALS:
        out.append(IRREGULAR_PLURALS[word])
    if word.endswith("men") and len(word) > 3:
        out.append(word[:-3] + "man")
    if word.endswith("ies") and len(word) > 4:
        out.append(word[:-3] + "y")
    if word.endswith("es") and len(word) > 3:
        out.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss") and len(word) > 2:
        out.append(word[:-1])
    return out


def _is_agent_noun(word: str) -> bool:
    """``-er`` of a known action verb (skier, snowboarder, runner) or an ``-ist`` (cyclist)."""
    if word.endswith("ist") and len(word) >= 6:
        return True
    if not word.endswith("er") or len(word) < 5:
        return False
    stems = {word[:-2], word[:-1]}
    if word[-3] == word[-4]:
        stems.add(word[:-3])  # runner -> run, swimmer -> swim
    if word.endswith("ier"):
        stems.add(word[:-3] + "y")
    return any(s in VERBS or wordnet.is_verb(s) for s in stems)


# agent-noun endings (streamer, YouTuber, barista, vlogger, parkourist, comedian, musketeer, prankster);
# the [not_person] lexicon lists the machines and things that end the same way (mixer, tractor, blender)
AGENT_SUFFIXES = ("er", "or", "ist", "ian", "ista", "eer", "ster")


def looks_agentive(word: str) -> bool:
    return len(word) >= 6 and word.endswith(AGENT_SUFFIXES) and word not in NOT_PERSON


def _unknown_agent_noun(word: str) -> bool:
    """A word WordNet 3.0 lacks in every part of speech (YouTuber, TikToker, vlogger, livestreamer)
    with an agent-noun ending: modern names for people who do something."""
    return wordnet.available() and looks_agentive(word) and not wordnet.is_common_word(word)


def _lexicon_says(forms: list[str], person: set[str] | frozenset[str],
                  not_person: set[str] | frozenset[str]) -> bool | None:
    if any(f in not_person for f in forms):
        return False
    if any(f in person for f in forms):
        return True
    return None


def _wordnet_says(word: str) -> bool | None:
    """WordNet's answer for a word it knows as a noun: a person when its most frequent sense or most
    of its senses are people ("fireman" is first a children's game), and no sense is an animal
    ("tiger" is first "a fierce person"); None when it does not know the word."""
    senses = wordnet.noun_senses(word)
    if not senses:
        return None
    mostly = senses[0] == "person" or 2 * senses.count("person") > len(senses)
    return mostly and "animal" not in senses


def _is_compound_person(word: str) -> bool:
    """A word WordNet lacks that ends in a person noun it has ("zookeeper" = zoo + keeper); not a
    verb form ("deflates" would end in "ates")."""
    return not wordnet.is_verb(word) and any(_wordnet_says(word[k:]) for k in range(3, len(word) - 4))


def is_person_word(word: str, extra_person: Iterable[str] = (), extra_non_person: Iterable[str] = ()) -> bool:
    """Whether one (head) word names a person. In order: the config's extra words; the lexicon file,
    the exact form before its lemma ("fans" is listed as people, "fan" as a thing); WordNet; for
    words WordNet lacks, compounds of person words and agent nouns (kayak -> kayaker)."""
    word = word.strip().strip("'").lower()
    if not word:
        return False
    if re.fullmatch(r"[a-z0-9]+-years?-olds?", word):  # "a 5-year-old"
        return True
    parts = [word] + ([word.rsplit("-", 1)[1]] if "-" in word else [])
    lemmas = [lem for p in parts for lem in _lemmas(p)]
    said = _lexicon_says(lemmas, set(extra_person), set(extra_non_person))
    for forms in (parts, lemmas):
        said = said if said is not None else _lexicon_says(forms, PERSON_NOUNS | PERSON_PRONOUNS, NOT_PERSON)
    for p in parts:
        said = said if said is not None else _wordnet_says(p)
    if said is not None:
        return said
    for lem in lemmas:
        if any(lem.endswith(s) and len(lem) > len(s) for s in PERSON_SUFFIXES) or _is_agent_noun(lem):
            return True
        if _unknown_agent_noun(lem):
            return True
        if wordnet.available() and _is_compound_person(lem):
            return True
    return False


REFERRING_PRONOUNS = _words("his her himself herself")  # "their/its" are as often things' ("its owner")
# first noun senses of words that are subjects without an article yet are no names ("Snow falls",
# "Water sprays"), and of things and animals that headline-style captions name bare ("Dog jumps")
_BARE_NOT_NAMES = frozenset("substance phenomenon food process event animal artifact".split())


def is_unknown_word(word: str) -> bool:
    """Whether WordNet (when installed) knows no form of ``word`` ("sparks" is "spark")."""
    return wordnet.available() and not any(wordnet.is_common_word(lem) for lem in _lemmas(word))


_THINGS = frozenset("artifact object animal plant substance food body location".split())  # "the river ... his hat"


def refers_back_to_a_person(word: str) -> bool:
    """Whether a subject ``word`` that a later "his / her / himself / herself" refers back to is a
    person: a word WordNet lacks, or one shaped like an agent noun ("the streamer falls off his chair":
    WordNet knows only the ribbon) made from a verb (stream-er) or with a person ending (-ist, -ian), and
    no machine, thing or animal by its first sense or the lexicon ("the river sweeps his hat away")."""
    if not wordnet.available() or word in NOT_PERSON:
        return False
    senses = wordnet.noun_senses(word)
    if "animal" in senses:
        return False
    if is_unknown_word(word):
        return True
    derived = _is_agent_noun(word) or word.endswith(AGENT_SUFFIXES[2:])  # stream-er, guitar-ist; not weather
    return looks_agentive(word) and derived and not (senses[:1] and senses[0] in _THINGS)


def _bare_subject_name(word: str, nxt: str, evidence: bool) -> bool:
    """A capitalised first word with no article, directly before a finite verb, is a name ("Rose falls
    off the swing", "Chase falls"): a singular common noun needs an article there. Not a mass noun
    ("Snow falls") nor a thing or animal named headline-style ("Dog jumps"), unless a later his/her
    refers back to it ("Mike loses his balance")."""
    finite = nxt in IRREGULAR_VERB_FORMS or (nxt in VERB_FORMS and nxt.endswith(("s", "ed"))) or (
        nxt.endswith("s") and wordnet.is_verb(nxt[:-1]) or nxt.endswith("es") and wordnet.is_verb(nxt[:-2]))
    if not finite or nxt.endswith("ing") or word in NOT_PERSON or len(_lemmas(word)) > 1 and word.endswith("s"):
        return False
    senses = wordnet.noun_senses(word)
    return evidence or not (senses[:1] and senses[0] in _BARE_NOT_NAMES)


def caption_names(caption: str) -> set[str]:
    """Lower-cased words the original-case caption capitalises as names ("Sarah falls", "then Mike
    jumps"): mid-sentence capitals not after a determiner ("the TV"), and a first word WordNet
    knows as a person's name or not at all. Names are people (paper 3.2 keeps person subjects)."""
    names = set()
    words = re.findall(r"[A-Za-z][A-Za-z'-]*|[.!?]", caption.replace("\u2019", "'"))
    for i, w in enumerate(words):
        w = w.split("'")[0]
        if not w[:1].isupper() or len(w) < 2 or w.isupper() and len(w) <= 3:
            continue  # "I", "TV", "DJ": pronouns and acronyms are not names
        low = w.lower()
        prev = words[i - 1].lower() if i else "."
        modal_name = i == 0 and low in ("will", "may", "can", "june", "august") and _bare_subject_name(
            low, words[1].lower() if len(words) > 1 else "", False)
        if (low in _FUNCTION_WORDS or prev in DETERMINERS) and not modal_name:
            continue
        if prev in (".", "!", "?"):  # a sentence's first word is capitalised anyway
            nxt = words[i + 1].lower() if i + 1 < len(words) else ""
            evidence = bool(REFERRING_PRONOUNS & {x.lower() for x in words[i + 2:]})
            if not _bare_subject_name(low, nxt, evidence) and (low in VERB_FORMS or not wordnet.is_person_name(w)):
                continue
        names.add(low)
    return names
