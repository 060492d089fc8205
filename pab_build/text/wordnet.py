"""WordNet for the subject filter: install it offline from Debian's ``wordnet-base``, and read
the person nouns (hyponyms of ``person.n.01``) through nltk.

nltk's own downloader reaches a host that build nodes cannot; Debian's package carries the same
WordNet 3.0 files. nltk's reader also wants a ``lexnames`` file, which Debian lacks: it is the
fixed table of WordNet 3.0's 45 lexicographer files, written here. ``python -m pab_build.text.wordnet``
(run by ``make install`` and CI) installs into ``$NLTK_DATA`` or ``~/nltk_data``. Without WordNet
the filter falls back to its lexicon alone and says so once in the log.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile

log = logging.getLogger(__name__)

LEXNAMES = """adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body
noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive
noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation
noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication
verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception
verb.possession verb.social verb.stative verb.weather adj.ppl""".split()
DEBIAN_PACKAGES = ("wordnet-base", "wordnet-sense-index")  # the data files; nltk also reads index.sense
_POS_NUMBER = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}


def data_root() -> str:
    """Where :func:`install` puts the corpus: the first ``$NLTK_DATA`` entry, else ``~/nltk_data``."""
    env = os.environ.get("NLTK_DATA", "").split(os.pathsep)[0]
    return env or os.path.expanduser("~/nltk_data")


def lexnames_text() -> str:
    return "".join(f"{i:02d}\t{name}\t{_POS_NUMBER[name.split('.')[0]]}\n" for i, name in enumerate(LEXNAMES))


def install(root: str | None = None) -> str:
    """Put Debian's WordNet 3.0 under ``<root>/corpora/wordnet``; returns that path. Needs
    ``apt-get`` and ``dpkg-deb`` (Debian/Ubuntu); a no-op when the corpus is already there."""
    dest = os.path.join(root or data_root(), "corpora", "wordnet")
    if os.path.exists(os.path.join(dest, "data.noun")) and os.path.exists(os.path.join(dest, "index.sense")):
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        download = ["apt-get", "download", *DEBIAN_PACKAGES]
        if subprocess.run(download, cwd=tmp, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)  # a fresh machine
            subprocess.run(download, cwd=tmp, check=True, capture_output=True)
        for deb in glob.glob(os.path.join(tmp, "*.deb")):
            subprocess.run(["dpkg-deb", "-x", deb, os.path.join(tmp, "x")], check=True)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(os.path.join(tmp, "x", "usr", "share", "wordnet"), dest)
    with open(os.path.join(dest, "lexnames"), "w", encoding="ascii") as f:
        f.write(lexnames_text())
    return dest


def _load_reader():
    from nltk.corpus import wordnet as wn

    wn.ensure_loaded()
    return wn


@functools.lru_cache(maxsize=1)
def _wordnet():
    """nltk's WordNet reader, or None (logged once) when nltk or the corpus is missing."""
    try:
        return _load_reader()
    except (ImportError, LookupError, OSError) as e:
        log.warning("WordNet is not available (%s): the subject filter uses its lexicon file only, "
                    "which knows fewer person nouns; install it with `python -m pab_build.text.wordnet`",
                    str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        return None


def available() -> bool:
    return _wordnet() is not None


@functools.lru_cache(maxsize=1)
def fingerprint() -> str:
    """Short hash of the WordNet noun data in use ("none" without it): part of the prompts stage's
    hash, since the filter's answers depend on it."""
    wn = _wordnet()
    if wn is None:
        return "none"
    path = wn.root.join("data.noun") if hasattr(wn.root, "join") else os.path.join(str(wn.root), "data.noun")
    h = hashlib.sha256()
    with open(str(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=4096)
def noun_senses(word: str) -> tuple[str, ...]:
    """The lexicographer file of each noun sense of ``word``, most frequent sense first
    ("person", "animal", "artifact", ...); () without WordNet or when it is no noun."""
    wn = _wordnet()
    if wn is None:
        return ()
    return tuple("person" if s in _person_synsets() else s.lexname().split(".", 1)[1]
                 for s in wn.synsets(word, pos="n"))


@functools.lru_cache(maxsize=1)
def _person_synsets() -> frozenset:
    wn = _wordnet()
    root = wn.synset("person.n.01")
    return frozenset(root.closure(lambda s: s.hyponyms())) | {root}


def is_common_word(word: str) -> bool:
    """Whether lower-case ``word`` is an English word in WordNet (any part of speech), as opposed to
    a name: WordNet spells proper nouns capitalised ("Sarah"), so ``sarah`` is not common."""
    wn = _wordnet()
    if wn is None:
        return True
    return any(lemma.name() == word for s in wn.synsets(word) for lemma in s.lemmas())


def is_verb(word: str) -> bool:
    wn = _wordnet()
    return wn is not None and bool(wn.synsets(word, pos="v"))


def is_person_name(word: str) -> bool:
    """Whether capitalised ``word`` is a name WordNet files under people ("John", "Sarah", "Tyler"),
    or a word WordNet does not know at all (most first names: "Kevin", "Priya")."""
    wn = _wordnet()
    if wn is None:
        return False
    synsets = wn.synsets(word.lower())
    if not synsets:
        return True
    return any(lemma.name() == word and s.lexname() == "noun.person" for s in synsets for lemma in s.lemmas())


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(install(sys.argv[1] if len(sys.argv) > 1 else None))
