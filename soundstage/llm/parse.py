"""Reading the object list out of what an LLM answered, without ever inventing one.

The prompt asks for reasoning followed by a final line ``ANSWER: ["guitar", "man"]``. Real
models wrap it in code fences, bold the marker, run out of tokens mid-list, answer in Python
quotes, repeat names or use plurals. ``parse_answer`` accepts those and nothing looser:

- the list after the LAST ``ANSWER:`` marker that is followed by one (earlier ones are drafts
  in the reasoning; a later "the answer: ..." in prose is not an answer line);
- with no marker, only a reply that is itself a list (or whose last line is one);
- a list cut off by the token limit keeps its complete names (``note`` says it was truncated);
  an answer cut before any complete name is unparseable, not "no sources";
- ``[]`` or ``ANSWER: none`` is a valid answer with no sources;
- names are lowercased, singularised (head noun) and deduplicated in order.

Anything else is ``unparseable`` and keeps the raw text for inspection.

``Vocabulary`` optionally maps the free-form names onto a dataset's class names
(``label2idx.json``) with a score in [0, 1]; the raw names are always kept beside them.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass

OK, UNPARSEABLE, ERROR = "ok", "unparseable", "error"

# ``ANSWER:``, ``**Answer:**``, ``Final answer:``; the last one in the text wins
_MARKER = re.compile(r"\banswer\b\s*\**\s*[:：]\s*\**", re.IGNORECASE)
_FENCE = re.compile(r"```[A-Za-z0-9_-]*")
_QUOTED = re.compile(r"\"((?:[^\"\\]|\\.)*)\"|'((?:[^'\\]|\\.)*)'")
_BARE_NAME = re.compile(r"^[^\W\d_][\w '\-]*$")
# an answer that says "nothing sounds" in words instead of []
_NOTHING = {"none", "nothing", "n/a", "na", "null", "no object", "no objects", "no sound", "no sources"}
_ARTICLES = ("a ", "an ", "the ")


@dataclass(frozen=True)
class ParsedAnswer:
    status: str  # OK or UNPARSEABLE
    names: list | None  # normalised names (None when unparseable)
    note: str = ""


def parse_answer(text: str | None) -> ParsedAnswer:
    """The object names in an LLM reply, or ``unparseable`` (see the module docstring)."""
    if not text or not text.strip():
        return ParsedAnswer(UNPARSEABLE, None, "empty reply")
    lowered = text.lower()
    if lowered.rfind("<think>") > lowered.rfind("</think>"):
        return ParsedAnswer(UNPARSEABLE, None, "reply ended inside its <think> section")
    markers = list(_MARKER.finditer(text))
    candidate = ""
    # the last marker followed by a list (a later "the answer: is ..." in prose is not one)
    for marker in reversed(markers):
        candidate = _unfence(text[marker.end() :])
        if candidate.split("\n", 1)[0].strip().lower().strip(".") in _NOTHING:
            return ParsedAnswer(OK, [], "answered in words that nothing sounds")
        if candidate.startswith("["):
            break
    if not markers:
        candidate = _unfence(text)
        if not candidate.startswith("["):
            # a reply whose last line is a list, after some reasoning without a marker
            candidate = candidate.rsplit("\n", 1)[-1].strip()
    if not candidate.startswith("["):
        return ParsedAnswer(UNPARSEABLE, None, "no answer list found")
    raw, note = _read_list(candidate)
    if raw is None:
        return ParsedAnswer(UNPARSEABLE, None, note)
    return ParsedAnswer(OK, normalise_names(raw), note)


def _unfence(s: str) -> str:
    return _FENCE.sub("", s).replace("`", "").strip()


def _read_list(s: str) -> tuple[list | None, str]:
    """Strings of the list that opens ``s``: (names, note) or (None, why not)."""
    end = _closing_bracket(s)
    if end is not None:
        try:
            value = json.loads(s[: end + 1])
        except ValueError:
            value = None
        if isinstance(value, list):
            if all(isinstance(v, str) for v in value):
                return value, ""
            return None, "answer list holds something other than names"
        names = _loose_items(s[1:end], truncated=False)
        return (names, "") if names is not None else (None, "answer list is not a list of names")
    names = _loose_items(s[1:], truncated=True)
    if not names:
        return None, "answer list cut off before its first complete name"
    return names, f"answer list cut off; kept {len(names)} complete name(s)"


def _closing_bracket(s: str) -> int | None:
    """Index of the ``]`` closing the ``[`` at s[0], skipping quoted text; None if cut off."""
    quote = None
    i = 1
    while i < len(s):
        c = s[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif c == "]":
            return i
        elif c == "[":
            return None  # nested lists are not an answer we asked for
        i += 1
    return None


def _loose_items(body: str, truncated: bool) -> list | None:
    """Items of a list body that is not valid JSON: single quotes, bare words, or cut off."""
    if '"' in body or "'" in body:
        names, last = [], 0
        for m in _QUOTED.finditer(body):
            if body[last : m.start()].strip(" \t\n,"):
                return None  # something other than separators between the names
            names.append(m.group(1) if m.group(1) is not None else m.group(2))
            last = m.end()
        rest = body[last:].strip(" \t\n,")
        if rest and not (truncated and rest[0] in "\"'"):
            return None
        return names
    items = [p.strip() for p in body.split(",")]
    if truncated:
        items = items[:-1]  # the last bare word may be cut in half
    items = [p for p in items if p]
    if not all(_BARE_NAME.match(p) for p in items):
        return None
    return items


# --- names -------------------------------------------------------------------------------

_IRREGULAR = {
    "people": "person",
    "men": "man",
    "women": "woman",
    "children": "child",
    "geese": "goose",
    "mice": "mouse",
    "feet": "foot",
    "teeth": "tooth",
    "oxen": "ox",
    "knives": "knife",
    "wolves": "wolf",
    "leaves": "leaf",
    "calves": "calf",
    "halves": "half",
    "buses": "bus",
    "gases": "gas",
    "lives": "life",
    "wives": "wife",
    "shelves": "shelf",
    "hooves": "hoof",
}
_INVARIANT = {
    "sheep",
    "deer",
    "fish",
    "series",
    "species",
    "news",
    "aircraft",
    "moose",
    "bison",
    "chassis",
    "lens",
    "scissors",
    "clothes",
    "pants",
    "jeans",
    "shorts",
    "trousers",
    "headquarters",
}
_NOT_MEN_PLURAL = {"specimen", "abdomen", "amen", "omen", "stamen", "semen"}


def singular(word: str) -> str:
    """English singular of one lowercase word, by rules good enough for object names."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if word in _INVARIANT or len(word) <= 3:
        return word
    if word.endswith("men") and word not in _NOT_MEN_PLURAL:
        return word[:-3] + "man"  # firemen, policewomen
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("sses", "shes", "ches", "xes", "zzes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def normalise_name(name: str) -> str:
    """Lowercase, single spaces, no article or edge punctuation, singular head noun."""
    name = re.sub(r"[\s_]+", " ", name.lower()).strip(" .,;:!?*\"'()")
    for article in _ARTICLES:
        if name.startswith(article):
            name = name[len(article) :]
    if not name or name in _NOTHING:
        return ""
    words = name.split(" ")
    words[-1] = singular(words[-1])
    return " ".join(words)


def normalise_names(raw: list) -> list:
    """Normalised names, empty ones and repeats dropped, first occurrence order kept."""
    seen, out = set(), []
    for item in raw:
        name = normalise_name(item)
        if name and name not in seen:
            seen.add(name)
            out.append(name)
    return out


# --- dataset vocabulary ------------------------------------------------------------------

# common free-form names -> AVSBench class names; used only if the target is in the vocabulary
SYNONYMS = {
    "guy": "man",
    "gentleman": "man",
    "male": "man",
    "lady": "woman",
    "female": "woman",
    "infant": "baby",
    "toddler": "baby",
    "puppy": "dog",
    "kitten": "cat",
    "automobile": "car",
    "plane": "airplane",
    "aeroplane": "airplane",
    "jet": "airplane",
    "aircraft": "airplane",
    "motorbike": "motorcycle",
    "scooter": "motorcycle",
    "chicken": "hen",
    "rooster": "hen",
    "drum kit": "drum",
    "drum set": "drum",
    "drumset": "drum",
    "sax": "saxophone",
    "fiddle": "violin",
    "ambulance": "emergency car",
    "police car": "emergency car",
    "fire truck": "emergency car",
    "fire engine": "emergency car",
    "rocket": "missile rocket",
    "missile": "missile rocket",
    "hairdryer": "hair dryer",
    "blow dryer": "hair dryer",
    "vacuum": "vacuum cleaner",
    "rifle": "gun",
    "pistol": "gun",
    "uke": "ukulele",
    "lorry": "truck",
    "ship": "boat",
}
EXACT, SYNONYM, HEAD_NOUN = 1.0, 0.95, 0.9


class Vocabulary:
    """Class names of a dataset; ``match`` scores a free-form name against them."""

    def __init__(self, names):
        # compare in normalised form ("emergency-car" -> "emergency car"), answer in the original
        self.by_key = {normalise_name(n.replace("-", " ")): n for n in names if n != "background"}

    @classmethod
    def from_label2idx(cls, path: str) -> Vocabulary:
        with open(path, encoding="utf-8") as f:
            return cls(list(json.load(f)))

    def match(self, name: str) -> tuple:
        """(class name or None, score). Exact 1.0, synonym 0.95, head noun 0.9, else string similarity."""
        key = normalise_name(name.replace("-", " "))
        head = key.rsplit(" ", 1)[-1]
        for candidate, score in ((key, EXACT), (SYNONYMS.get(key), SYNONYM), (head, HEAD_NOUN), (SYNONYMS.get(head), HEAD_NOUN)):
            if candidate in self.by_key:
                return self.by_key[candidate], score
        best, best_score = None, 0.0
        for vocab_key, vocab_name in self.by_key.items():
            score = difflib.SequenceMatcher(None, key, vocab_key).ratio()
            if score > best_score:
                best, best_score = vocab_name, score
        return best, round(best_score, 4)

    def map_names(self, names: list, min_score: float) -> tuple[list, list]:
        """Mapped names (None below ``min_score``) and their scores, aligned with ``names``."""
        mapped, scores = [], []
        for name in names:
            target, score = self.match(name)
            mapped.append(target if score >= min_score else None)
            scores.append(score)
        return mapped, scores
