"""The label in a VLM's answer to an attribute question (paper appendix A.1).

The prompts ask for "a single word or phrase", but Qwen2-VL often answers in a sentence, with
lead-ins ("Based on the caption and image, ..."), markdown, lists, quotes or a refusal. The label
is read from the sentence's structure, not from a list of known answers:

- framing goes first: markdown and bullets, a first line that only names the answer, a
  ``Header:`` prefix, a quoted phrase, lead-ins ("In the image,", "It appears that");
- a refusal or hedge ("I cannot determine", "It is not clear", "No failure is visible") is no label;
- "<the scene / failure / action ...> is X": X is the label;
- "<someone> <verb> ...": action and anomaly labels are the predicate as a gerund ("The man falls off
  his bike" -> "falling off his bike"; an action keeps only the verb and its object, as the
  prompt's examples do: "riding scooter"); a scene label is the place the sentence puts them in
  ("... skateboarding in a parking lot" -> "parking lot");
- otherwise the answer is the phrase itself, cut at its first clause.

:func:`answer_label` returns None when no label can be read; the stage rejects that row.
"""

from __future__ import annotations

import re

_QUOTED = re.compile(r"(?:^|(?<=[\s:(]))[\"\u201c\u2018'`]+([^\"\u201c\u201d\u2018\u2019'`]{1,60}?)[\"\u201d\u2019'`]+(?=[\s.,;:!?)*]|$)")
_BULLET = re.compile(r"^\s*(?:[-*\u2022>#]+|\(?\d{1,2}[.)])\s+")
_MARKUP = re.compile(r"[*_`#]+")
_HEADER = re.compile(r"^([a-z][a-z' /-]{0,60}?):\s*(.*)$")  # "Summary: ...", "The anomaly is: ..."

# lead-in clauses that frame the answer ("Based on the caption and image, ...")
_LEAD_INS = re.compile(
    r"^(?:(?:based on|according to|judging (?:by|from)|looking at|from|in|given|considering)\b[^,]{0,60},\s*|"
    r"(?:overall|so|therefore|thus|yes|well|sure|certainly|here|answer|in summary|in short|to summarize),?\s+|"
    r"it (?:appears|seems|looks)(?: like| that| as if| as though)?\s+|"
    r"(?:i think|i believe|probably|likely|apparently|clearly)(?: that)?,?\s+)"
)
_REFUSAL = re.compile(
    r"\b(?:cannot|can ?not|can't|unable|impossible|sorry|(?:difficult|hard) to|too (?:blurry|dark|small|unclear)|unclear|unknown|uncertain|unsure|unidentifiable|"
    r"n/?a|none|nothing|not (?:clear|possible|visible|sure|certain|determinable|shown|apparent|evident|enough|"
    r"specified|provided|mentioned|identifiable)|(?:does|do|did)(?: not|n't) (?:show|appear|depict|contain|"
    r"seem|have)|there (?:is|are) no|no (?:\w+ )?(?:is |are )?(?:visible|shown|apparent|evident|present)|"
    r"no (?:person|people|one|character|characters|failure|anomaly|action|scene|background|human))\b"
)

# "the <meta word> (of ...) is X": the answer names itself
_META = frozenset("""action actions activity activities behavior behaviour behaviors behaviours category
categories class failure failures anomaly anomalies scene background backgrounds setting location place
environment answer summary label type mistake accident event""".split())
_COPULA = re.compile(
    r"\b(?:is|are|was|were|would be|can be (?:summari[sz]ed|described|categori[sz]ed|classified|labell?ed|"
    r"identified|called) as|could be (?:summari[sz]ed|described) as|appears to be|seems to be|looks like|"
    r"involves|includes|consists of|is made up of|shows|depicts|features|displays)\b:?\s*"
)
_PLACE_VERBS = re.compile(r"\b(?:takes? place|(?:is|are) (?:set|located|situated|happening|taking place))\b\s*")
_SHOWS = re.compile(r"^(?:the |this )?(?:image|picture|photo|photograph|frame|video|caption|it|this|that)\s+"
                    r"(?:shows|depicts|features|is|appears to be|seems to be|looks like|could be)\s+")

_DETERMINERS = frozenset("a an the this that these those his her their its my our your some two three one".split())
_PRONOUNS = frozenset("he she they it someone somebody people everyone we i you".split())
_PREPOSITIONS = frozenset("""in on at into onto off of over under from to with by for through across along around
down up out inside outside near behind above below against toward towards upon beside between onto""".split())
_BOUNDARY = frozenset("""and but while as because when after before which who that then so or since until
whereas although though""".split())
_AUX = frozenset("is are was were am be been being has have had does do did gets get got getting".split())
_HEDGES = re.compile(r"^(?:appears?|seems?|looks?|happens?) to be\s+|^(?:appears?|seems?|happens?) to\s+")
_ABOUT_TO = re.compile(r"^(?:about|going|starting|beginning|preparing) to\s+")
_SKIP_TO_INNER = re.compile(r"^(?:trying|attempting|tries|tried|attempts|attempted) to\s+")
_ENGAGED = re.compile(r"^(?:engaged|involved|participating|taking part) in\s+(?:the (?:activity|act|sport) of\s+)?")
_PLACE_PREPOSITIONS = frozenset("in at on inside near down along across through into onto outside by beside".split())
_PART_OF = frozenset("front edge side top bottom middle corner center centre end back part area inside".split())
_VAGUE_PLACES = frozenset(["", "indoor", "indoors", "outdoor", "outdoors", "inside", "outside"])
_NOT_PLACES = frozenset("image picture photo photograph frame video caption scene background air middle "
                        "process act front way midst moment".split())

_IRREGULAR = {  # past / participle -> base, for the gerund of a finite verb
    "fell": "fall", "fallen": "fall", "lost": "lose", "ran": "run", "rode": "ride", "ridden": "ride",
    "slid": "slide", "threw": "throw", "thrown": "throw", "broke": "break", "broken": "break", "got": "get",
    "gotten": "get", "sat": "sit", "stood": "stand", "swam": "swim", "caught": "catch", "hit": "hit",
    "took": "take", "taken": "take", "went": "go", "gone": "go", "flew": "fly", "flown": "fly", "struck": "strike",
    "stuck": "stick", "spun": "spin", "swung": "swing", "knocked": "knock", "dove": "dive", "drove": "drive",
    "driven": "drive", "made": "make", "did": "do", "done": "do", "hurt": "hurt", "cut": "cut", "put": "put",
    "let": "let", "shot": "shoot", "led": "lead", "kept": "keep", "left": "leave", "held": "hold", "sang": "sing",
    "began": "begin", "tore": "tear", "torn": "tear", "bit": "bite", "bitten": "bite", "blew": "blow",
    "tripped": "trip", "fought": "fight", "lay": "lie", "lying": "lie", "dug": "dig", "wore": "wear", "ate": "eat",
}
_ING_VERBS = frozenset("bring sting swing fling cling sling wring string spring".split())  # not gerunds
_COMMON_VERBS = frozenset("""jump fall slip trip run ride play try fail crash hit lose swim dance climb walk
skate sit stand throw catch kick push pull slide flip spin roll drop break get go watch look laugh scream fly dive
bounce attempt tumble collide land miss knock stumble race chase swing""".split())
_E_VERBS = frozenset("""lose ride slide dive drive skate glide race dance bounce take make come move lose juggle
wrestle tumble stumble topple wobble hurdle paddle cycle pose use trace chase smile bite shave serve tackle
raise rise slice face scare surprise strike blaze graze collide dodge surface leave type vape scrape hike
swipe wipe tape tease squeeze breathe sneeze sprinkle struggle fumble cruise place tie lie die""".split())


def _base(verb: str) -> str:
    """Base form of a finite verb or participle ("falls", "slipped", "lost" -> fall, slip, lose)."""
    if verb in _IRREGULAR:
        return _IRREGULAR[verb]
    for suffix in ("ies", "ied"):
        if verb.endswith(suffix) and len(verb) > 4:
            return verb[:-3] + "y"
    if verb.endswith("ed") and len(verb) > 4:
        stem = verb[:-2]
        if len(stem) > 3 and stem[-1] == stem[-2] and stem[-1] not in "lsz":
            return stem[:-1]  # slipped -> slip
        silent_e = re.search(r"(?:[bcdfgkpstz]l|v|dg|[^aeiou]c|uc|at|iz|os)$", stem)  # tumbled, dodged, danced
        return stem + "e" if stem + "e" in _E_VERBS or silent_e else stem
    if verb.endswith(("sses", "shes", "ches", "xes", "zzes", "oes")):
        return verb[:-2]
    if verb.endswith("s") and not verb.endswith(("ss", "us", "is")):
        return verb[:-1]
    return verb


def gerund(verb: str) -> str:
    """-ing form of a verb in any form ("falls" -> "falling", "slips" -> "slipping", "loses" -> "losing")."""
    if verb.endswith("ing") and len(verb) >= 5 and verb not in _ING_VERBS:
        return verb
    base = _base(verb)
    if base.endswith("ie"):
        return base[:-2] + "ying"
    if base.endswith("e") and not base.endswith(("ee", "ye", "oe")) and len(base) > 2:
        return base[:-1] + "ing"
    vowels = re.findall(r"[aeiou]+", base)
    if (len(vowels) == 1 and re.search(r"[^aeiou][aeiou][^aeiouwxy]$", base)):
        return base + base[-1] + "ing"  # slip -> slipping, hit -> hitting
    return base + "ing"


def _words(text: str) -> list[str]:
    return re.findall(r"[^\W_]+(?:[-'][^\W_]+)*", text)


def _cut_clause(words: list[str], start: int = 0) -> list[str]:
    out = []
    for w in words[start:]:
        if w in _BOUNDARY and out:
            break
        out.append(w)
    return out


def _strip_articles(words: list[str]) -> list[str]:
    while words and words[0] in ("a", "an", "the"):
        words = words[1:]
    return words


def _place(words: list[str]) -> list[str]:
    """The place noun phrase at the start of ``words`` ("in a parking lot near ..." -> parking lot)."""
    while words and (words[0] in _PREPOSITIONS or words[0] in ("outdoors", "indoors", "outside", "inside")):
        words = words[1:]
    out, words = [], _strip_articles(words)
    for i, w in enumerate(words):
        if w in _PREPOSITIONS or w in _BOUNDARY or w in _AUX:
            if w == "of" and out and out[-1] in _PART_OF:  # "in front of a house", "the edge of a pool"
                return _place(words[i + 1:])
            break
        out.append(w)
    return out


def _verb_at(words: list[str]) -> int | None:
    """Index of the main verb after a subject noun phrase, or None when the answer does not start
    with one (a bare phrase such as "riding a bicycle")."""
    if not words:
        return None
    if words[0] in _PRONOUNS:
        return 1 if len(words) > 1 else None
    if words[0] not in _DETERMINERS:
        return None
    for i in range(1, min(len(words), 9)):
        w, prev = words[i], words[i - 1]
        if prev in _DETERMINERS or prev in _PREPOSITIONS or i == 1:
            continue  # a word right after "the" / "in" is part of the noun phrase
        if w in _AUX or _HEDGES.match(" ".join(words[i:i + 3]) + " "):
            return i
        if w in _PREPOSITIONS or w in _BOUNDARY:
            continue
        nxt = words[i + 1] if i + 1 < len(words) else ""
        plain_next = nxt in _COMMON_VERBS  # "the young boys jump": a plural noun, then its verb
        finite = (w in _IRREGULAR or (w.endswith(("ed", "ing")) and len(w) > 4 and w not in _ING_VERBS) or
                  (w.endswith("s") and not w.endswith(("ss", "us", "is")) and nxt not in _AUX and not plain_next))
        if finite or (prev.endswith("s") and not prev.endswith("ss")):  # "the characters fail to ..."
            return i
    return None


def _predicate(words: list[str], question: str) -> list[str] | None:
    """The predicate from its verb on as a gerund phrase ("falls off his bike" -> falling off his bike)."""
    rest, aux = " ".join(words), set()
    for _ in range(4):
        before = rest
        rest = _HEDGES.sub("", rest)
        m = re.match(r"^(is|are|was|were|am|be|been|being|has|have|had|gets|get|got|getting|does|do|did)\s+(?=not|\w)",
                     rest)
        if m and (m.group(1) not in ("does", "do", "did") or rest[m.end():].startswith(("not", "n't"))):
            aux.add(m.group(1))
            rest = rest[m.end():]
        rest = re.sub(r"^(?:seen|shown|caught|captured|depicted)\s+(?=\w+ing\b)", "", rest)  # "is seen falling"
        rest = _ENGAGED.sub("", rest)
        rest = _ABOUT_TO.sub("", rest)  # "is about to fall" -> falling
        if question == "action":
            rest = _SKIP_TO_INNER.sub("", rest)
        if rest == before:
            break
    w = _words(rest)
    if not w or w[0] in ("not", "no", "never", "in", "at", "on", "n't"):
        return None
    if w[0] in _DETERMINERS:  # "engaged in a snowball fight": a noun phrase names the activity
        return (["having"] if aux & {"has", "have", "had"} else []) + _cut_clause(_strip_articles(w))
    participle = w[0] in _IRREGULAR or w[0].endswith("ed")
    if participle and aux & {"is", "are", "was", "were", "am", "be", "being", "gets", "get", "got", "getting"}:
        w = ["getting"] + w  # passive: "was hit by a ball" -> getting hit by a ball
    else:
        w = [gerund(w[0])] + w[1:]
    phrase = _cut_clause(w)
    if question == "action":  # verb + its object ("riding a skateboard down a ramp" -> riding a skateboard)
        for i, x in enumerate(phrase[1:], 1):
            if x in _PREPOSITIONS and not (x in ("out", "up", "down", "over", "off") and i == 1 and
                                           len(phrase) == 2):
                phrase = phrase[:i]
                break
    return phrase


def _first_line(answer: str) -> str:
    """The first line that says something, without markdown, bullets or a bare header ("Answer:")."""
    for line in answer.replace("\r", "\n").split("\n"):
        line = _MARKUP.sub("", _BULLET.sub("", line.strip())).strip()
        if line and not re.fullmatch(r"[\w' /-]{0,40}:", line):
            return line
    return ""


def _shorten(words: list[str], max_words: int) -> list[str]:
    if len(words) <= max_words:
        return words
    for i in range(max_words, 0, -1):  # drop trailing prepositional phrases first
        if words[i] in _PREPOSITIONS and i > 0:
            return words[:i]
    return words[:max_words]


def answer_label(question: str, answer: str, max_words: int = 6) -> str | None:
    """The category phrase in a VLM ``answer`` to the ``question`` (action, anomaly or scene), lowercase;
    None when no label can be read (a refusal, a hedge, nothing but framing)."""
    raw = answer or ""
    quoted = _QUOTED.findall(raw.split("\n\n")[0])
    text = _first_line(raw).lower().replace("\u2019", "'")
    text = re.split(r"(?<=[a-z0-9)\"'\u201d])[.!?](?:\s|$)", text)[0]  # first sentence
    text = text.strip(" .!?\"'\u201c\u201d\u2018\u2019`")
    head = _HEADER.match(text)
    if head and head.group(2) and len(head.group(1).split()) <= 8:
        text = head.group(2).strip(" \"'\u201c\u201d")
    for _ in range(3):
        text = _LEAD_INS.sub("", text, count=1)
    main = re.split(r",|\b(?:because|while|as|when|but|since)\b", text)[0]
    if not text or _REFUSAL.search(main) or re.fullmatch(r"(?:no|none|nothing|unknown|n/?a|-+|\?+)", text):
        return None
    if quoted:  # 'The behavior ... is "skateboarding".': the quoted phrase is the answer
        inner = " ".join(_words(quoted[-1].lower()))
        if inner and len(inner.split()) <= max_words and (len(_words(text)) > len(inner.split()) or
                                                         text.startswith(("'", '"'))):
            text = inner
    parts = [p for p in re.split(r"[,;(\[/]", text) if p.strip()] or [""]
    label: list[str] = []
    for part in parts[:3 if question == "scene" else 1]:  # "Outdoors, in a park" -> park
        label = _shorten(_strip_articles(_read(question, part, _words(part)) or []), max_words)
        if " ".join(label) not in _VAGUE_PLACES:
            break
    return " ".join(label) or None


def _read(question: str, text: str, words: list[str]) -> list[str] | None:
    place = _PLACE_VERBS.search(text) if question == "scene" else None
    if place:
        return _place(_words(text[place.end():]))
    copula = _COPULA.search(text)
    subject = _words(text[:copula.start()]) if copula else []
    if copula and subject and len(subject) <= 14 and (
            _META & set(subject[:subject.index("of")] if "of" in subject else subject)):
        rest = _words(text[copula.end():])  # "the scene or background (of ...) is a gym"
        if not rest or rest[0] in ("not", "no", "unclear", "unknown"):
            return None
        if question == "scene":  # "the scene shows a man in a gym" -> gym; "the scene is a gym in a school" -> gym
            return _scene_in(rest) if copula.group(0).startswith(("shows", "depicts", "features", "displays")) \
                else _place(rest)
        return _bare(question, rest)
    if question == "scene":
        shows = _SHOWS.match(text)
        if shows:
            return _scene_in(_words(text[shows.end():]))
        for preps in (("in", "at", "inside"), _PLACE_PREPOSITIONS):  # "on a couch in a living room"
            for i, w in enumerate(words):
                if w in preps and i > 0:
                    got = _place(words[i:])
                    if got and got[-1] not in _NOT_PLACES:
                        return got
        verb = _verb_at(words)  # a sentence without a place ("The man falls.") names no scene
        if set(words) & _AUX or verb is not None and _base(words[verb]) in _COMMON_VERBS:
            return None
        return _place(_cut_clause(words))  # "a snowy hill with pine trees"
    verb = _verb_at(words)
    if verb is not None:
        return _predicate(words[verb:], question)
    return _bare(question, words)


def _scene_in(words: list[str]) -> list[str]:
    """The place in "a man skateboarding in a skate park" (its in/at phrase), else the phrase itself."""
    for i, w in enumerate(words):
        if w in ("in", "at", "inside") and i > 0:
            got = _place(words[i:])
            if got and got[-1] not in _NOT_PLACES:
                return got
    return _place(words)


def _bare(question: str, words: list[str]) -> list[str]:
    """A phrase given as is ("Riding a bicycle", "falling into water"), cut at its first clause."""
    words = _cut_clause(words)
    if words and question != "scene" and _verb_at(words) is not None:
        return _predicate(words[_verb_at(words):], question) or []
    nxt = words[1] if len(words) > 1 else ""
    if words and (words[0] in _IRREGULAR or words[0].endswith("ed")) and (not nxt or nxt in _PREPOSITIONS):
        lead = ["getting", words[0]] if "by" in words else [gerund(words[0])]  # "Knocked over by a wave"
        return lead + words[1:]  # "Slipped on ice" -> slipping on ice
    return words
