#!/usr/bin/env python3
"""Needle / retrieval task definitions shared by duo's demo-model training and evaluation.

This module is the single place where the synthetic retrieval tasks and their exact wordings are
defined (docs/demo_models.md mirrors it for the C++ harness `duo niah`).  Run it as a script to print
example documents:

    python3 tools/make_needle_data.py --examples 5 [--corpus DIR]
    python3 tools/make_needle_data.py --sentences 20 --corpus DIR   # sentence needles only

Prompt format (identical for training and evaluation):

    <|begin_of_text|>{haystack part 1}\n{NEEDLE}\n{haystack part 2}\n\nQuestion: {QUESTION}\nAnswer: {ANSWER}\n

The needle is inserted at a TOKEN position of the already-tokenized haystack (token-level
concatenation: tokens(haystack[:d]) + tokens("\n" + needle + "\n") + tokens(haystack[d:])), the
question block is tokenized separately as tokens("\n\nQuestion: " + question + "\nAnswer:"), and the
model greedily generates " " + answer + "\n".  Score: decode the generated tokens, cut at the first
newline, strip; numeric / word passkeys and key-value answers are exact-match, sentence needles are
scored by exact match and by the share of the needle's words found in the answer.

Training documents may contain several needles and several question blocks (each question identifies
its needle unambiguously); further question blocks follow as "\nQuestion: ...\nAnswer: ...\n" and
the document ends with <|end_of_text|>.
"""
from __future__ import annotations

import argparse
import random
import re
from dataclasses import dataclass

# ----------------------------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------------------------

# Classic passkey-retrieval filler (Mohtashami & Jaggi 2023); repeated to the target length.
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "

NATO = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett",
        "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango",
        "uniform", "victor", "whiskey", "xray", "yankee", "zulu"]

ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth",
            "tenth"]

# Question-block strings (token-level segments, see module docstring).
QUESTION_PREFIX_FIRST = "\n\nQuestion: "
QUESTION_PREFIX_NEXT = "\nQuestion: "
ANSWER_PREFIX = "\nAnswer:"
# DuoAttention's own multi_passkey10 answer prefix (used by some word-passkey training documents so
# the model also answers the pattern-identification data format of docs/duoattention.md section 4).
DUO_PASSKEY_PREFIX = "\nPasskey:"

# Canonical needle separators (evaluation); training also uses the other variants.
NEEDLE_SEPS = [("\n", "\n"), (" ", " "), ("\n\n", "\n\n"), (" ", "\n")]
CANONICAL_SEP = ("\n", "\n")

# --- numeric passkeys: (needle template, question paraphrases).  Identity = the wording. -----------
PASSKEY_WORDINGS = [
    ("The pass key is {n}. Remember it. {n} is the pass key.",
     ["What is the pass key?", "What is the pass key mentioned in the text?",
      "Which number is the pass key?", "Recall the pass key. What is it?"]),
    ("The secret passkey is {n}.",
     ["What is the secret passkey?", "Which number is the secret passkey?",
      "What secret passkey is mentioned in the text?", "Recall the secret passkey."]),
    ("Remember this number: the access code is {n}.",
     ["What is the access code?", "Which number is the access code?",
      "What access code was given in the text?", "Recall the access code."]),
    ("The magic number is {n}. Keep it in mind.",
     ["What is the magic number?", "Which number is the magic number?",
      "What magic number is mentioned in the text?", "Recall the magic number."]),
]

# --- word passkeys (NATO words).  Identity = the ordinal. -----------------------------------------
WORD_PASSKEY_NEEDLES = [
    "Remember this sequence of words, it's the {ord} passkey to the vault: {words}",
    "The {ord} passkey to the vault is the sequence of words: {words}.",
    "Here is the {ord} passkey to the vault, remember it: {words}.",
]
WORD_PASSKEY_QUESTIONS = [
    "What is the {ord} passkey to the vault?",
    "Based on the content of the book, what is the {ord} passkey to the vault?",
    "Which words form the {ord} passkey to the vault?",
    "Recall the {ord} passkey to the vault.",
]

# --- key-value lookup.  Identity = the key. --------------------------------------------------------
KV_WORDINGS = [
    ("The special magic number for {k} is: {v}.",
     ["What is the special magic number for {k}?", "Which special magic number belongs to {k}?",
      "What special magic number was given for {k}?"]),
    ("Key: {k}. Value: {v}.",
     ["What is the value for key {k}?", "Which value belongs to key {k}?",
      "What value is stored under key {k}?"]),
    ("The code associated with {k} is {v}.",
     ["What code is associated with {k}?", "What is the code associated with {k}?",
      "Which code belongs to {k}?"]),
    ("In the registry, {k} maps to {v}.",
     ["What does {k} map to in the registry?", "In the registry, what does {k} map to?",
      "Which entry does {k} map to in the registry?"]),
]
KV_ADJ = ["red", "blue", "green", "silver", "golden", "quiet", "rapid", "ancient", "frozen", "hidden",
          "bright", "dark", "little", "northern", "southern", "wild", "gentle", "iron", "crystal",
          "hollow", "lucky", "purple", "sleepy", "brave", "copper", "misty", "royal", "sunny",
          "stormy", "velvet"]
KV_NOUN = ["falcon", "river", "lantern", "castle", "meadow", "harbor", "comet", "forest", "engine",
           "garden", "tower", "island", "mountain", "violin", "compass", "anchor", "bridge",
           "cathedral", "desert", "glacier", "kettle", "mirror", "orchard", "pyramid", "rocket",
           "saddle", "temple", "tunnel", "valley", "window"]

# --- sentence needles.  Answer = the whole needle sentence. Identity = template + subject. ---------
# The slots are filled from a huge space (runs of real corpus words, random corpus words, random
# proper nouns), so the only way to answer is to copy the needle; the small lists below are only a
# part of the mix.  San Francisco and Dolores Park never occur in a training needle (BANNED_WORDS,
# BANNED_PHRASES): the classic needle stays unseen.
CITIES = ["Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Lisbon", "Vienna", "Prague",
          "Dublin", "Oslo", "Stockholm", "Helsinki", "Warsaw", "Athens", "Cairo", "Nairobi",
          "Lagos", "Mumbai", "Delhi", "Bangkok", "Hanoi", "Seoul", "Sydney", "Melbourne",
          "Auckland", "Toronto", "Montreal", "Chicago", "Boston", "Seattle", "Denver", "Austin",
          "Miami", "Havana", "Lima", "Santiago", "Bogota", "Quito", "Mexico City", "Istanbul",
          "Budapest", "Edinburgh", "Amsterdam", "Brussels", "Copenhagen", "Zurich", "Geneva",
          "Venice", "Florence", "Naples", "Kyoto", "Osaka", "Singapore", "Manila", "Jakarta"]
NAMES = ["Alice", "Bruno", "Clara", "Daniel", "Elena", "Felix", "Greta", "Hugo", "Irene", "Jonas",
         "Karin", "Leo", "Marta", "Nico", "Olga", "Pablo", "Rosa", "Simon", "Tanya", "Victor",
         "Wanda", "Yusuf", "Zoe", "Arthur", "Beatrice", "Cedric", "Dora", "Edgar", "Flora",
         "Gustav", "Hannah", "Ivan", "Julia", "Kurt", "Lena", "Milo", "Nora", "Oscar", "Petra"]
ACTS = ["eat a sandwich", "read a good book", "drink fresh coffee", "watch the sunset",
        "ride a bicycle", "fly a kite", "play chess", "listen to jazz", "paint a small picture",
        "walk the dog", "buy warm bread", "write a long letter", "feed the ducks",
        "sing old songs", "climb the stone stairs", "swim in the cold water", "take photographs",
        "share a picnic", "sketch the old houses", "eat fresh oysters", "try the spicy noodles",
        "drink hot chocolate", "watch the street musicians", "rent a small boat", "visit the markets",
        "dance until midnight", "count the stars", "collect sea shells", "play the guitar",
        "plant some flowers"]
PLACES = ["by the old harbor", "on the north beach", "near the city library",
          "under the tall oak trees", "at the top of the hill", "in the botanical garden",
          "along the river", "in the main square", "behind the old cathedral",
          "on the roof of the museum", "in a quiet courtyard", "beside the train station",
          "at the edge of the forest", "on the stone bridge", "inside the glass greenhouse",
          "next to the fountain", "in the narrow alleys", "on the old pier", "near the lighthouse",
          "in the rose garden"]
TIMES = ["on a sunny day", "early in the morning", "after a long rain", "on a quiet Sunday",
         "at dusk", "in late autumn", "on a warm summer night", "during the spring festival",
         "before breakfast", "on a foggy afternoon", "in the first snow of winter",
         "when the bells ring at noon"]
DISHES = ["soup", "stew", "pie", "cake", "curry", "salad", "bread", "pasta", "pudding", "omelette",
          "risotto", "dumplings"]
VERBS = ["eat", "read", "visit", "watch", "sit", "walk", "find", "buy", "sing", "write", "climb",
         "follow", "remember", "carry", "paint", "hear", "share", "count", "keep", "bring"]
PREPS = ["in", "on", "at", "near", "behind", "under", "beside", "inside", "along", "across"]
PLACE_NOUNS = ["Park", "Square", "Garden", "Street", "Harbor", "Bridge", "Hill", "Market", "Lane",
               "Bay", "Gate", "Tower", "Beach", "Valley", "Court", "Hall"]
NAME_PREFIXES = ["San", "Santa", "Port", "New", "Saint", "Fort", "Mount", "Lake", "North", "Upper",
                 "Los", "El", "East", "Little"]
SYLLABLES = ["ka", "lo", "mir", "ven", "dor", "ta", "bel", "ri", "an", "gu", "sel", "tor", "ma",
             "ni", "zo", "el", "tha", "ros", "qui", "var", "len", "dra", "pe", "sha", "mon", "ul",
             "cas", "bri", "fen", "o", "is", "ku", "ral", "te", "wyn", "hal", "jo", "mer", "nu", "sto"]
BANNED_WORDS = {"francisco", "dolores"}
BANNED_PHRASES = ("San Francisco", "Dolores Park")

_WORD_RE = re.compile(r"[A-Za-z]+(?:'[a-z]+)?,?")


class SlotSource:
    """Slot contents for sentence needles: runs of consecutive words of real text, random words of
    it, and random proper nouns (corpus capitalised words, made-up names, the small lists above)."""

    def __init__(self, text: str):
        words = [w for w in _WORD_RE.findall(text) if w.rstrip(",").lower() not in BANNED_WORDS]
        if len(words) < 100:
            raise ValueError(f"SlotSource needs a text of at least 100 words, got {len(words)}")
        self.words = words
        self.plain = sorted({w.rstrip(",").lower() for w in words})
        caps = sorted({w.rstrip(",") for w in words if w[0].isupper() and len(w.rstrip(",")) >= 3
                       and not w.rstrip(",").isupper()})
        self.caps = caps or ["Alder"]

    def phrase(self, rng: random.Random, n: int) -> str:
        """n consecutive words of the text (commas kept inside, none at the end)."""
        i = rng.randrange(len(self.words) - n)
        return " ".join(self.words[i:i + n]).rstrip(",")

    def bag(self, rng: random.Random, n: int) -> str:
        """n random words of the text, lower case."""
        return " ".join(rng.choice(self.plain) for _ in range(n))

    def made_up_name(self, rng: random.Random) -> str:
        return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()

    def proper(self, rng: random.Random) -> str:
        """A proper noun of one or two words."""
        r = rng.random()
        if r < 0.3:
            return self.made_up_name(rng)
        if r < 0.55:
            return rng.choice(self.caps)
        if r < 0.8:
            first = rng.choice(NAME_PREFIXES) if rng.random() < 0.6 else rng.choice(self.caps)
            return f"{first} {rng.choice([self.made_up_name(rng), rng.choice(self.caps)])}"
        return rng.choice(CITIES + NAMES)

    def activity(self, rng: random.Random, easy: bool = False) -> str:
        """What follows "is" / "to" in a sentence needle: 3 to ~30 words."""
        hi = 8 if easy else 24
        r = rng.random()
        if r < 0.25:  # shaped like the classic needle, with random content
            a1 = rng.choice(ACTS) if rng.random() < 0.3 else f"{rng.choice(VERBS)} {self.bag(rng, rng.randint(1, 3))}"
            a2 = rng.choice(ACTS) if rng.random() < 0.3 else f"{rng.choice(VERBS)} {self.bag(rng, rng.randint(1, 3))}"
            place = f"{rng.choice(PREPS)} {self.proper(rng)} {rng.choice(PLACE_NOUNS)}"
            when = rng.choice(TIMES) if rng.random() < 0.5 else f"{rng.choice(PREPS)} {self.bag(rng, rng.randint(1, 4))}"
            return rng.choice([f"{a1} and {a2} {place} {when}", f"{a1} {place} {when}",
                               f"{a1} and {a2} {place}", f"{a1} {place}"])
        if r < 0.55:
            return f"{rng.choice(VERBS)} {self.phrase(rng, rng.randint(2, hi))}"
        if r < 0.75:
            return self.phrase(rng, rng.randint(3, hi))
        if r < 0.9:
            return self.bag(rng, rng.randint(3, max(3, hi - 8)))
        a1 = rng.choice(ACTS)  # the old small-vocabulary form
        return rng.choice([f"{a1} {rng.choice(PLACES)} {rng.choice(TIMES)}", f"{a1} {rng.choice(PLACES)}"])


# Without a corpus (examples, tests): a text made of the word lists above.
_DEFAULT_SLOTS: SlotSource | None = None


def default_slots() -> SlotSource:
    global _DEFAULT_SLOTS
    if _DEFAULT_SLOTS is None:
        _DEFAULT_SLOTS = SlotSource(" ".join(ACTS + PLACES + TIMES + CITIES + NAMES + [FILLER]))
    return _DEFAULT_SLOTS


SENTENCE_TEMPLATES = [
    # (needle, questions) -- the answer is always the needle sentence itself; the first slot is the
    # subject that the question names.
    ("The best thing to do in {x} is {y}.",
     ["What is the best thing to do in {x}?",
      "According to the text, what is the best thing to do in {x}?",
      "What does the text say is the best thing to do in {x}?"]),
    ("{x}'s favorite hobby is to {y}.",
     ["What is {x}'s favorite hobby?", "According to the text, what is {x}'s favorite hobby?",
      "What does {x} like to do most?"]),
    ("The secret ingredient in {x}'s {dish} is {y}.",
     ["What is the secret ingredient in {x}'s {dish}?",
      "According to the text, what is the secret ingredient in {x}'s {dish}?",
      "Which secret ingredient does {x} put in the {dish}?"]),
    ("The treasure of {x} is hidden {y}.",
     ["Where is the treasure of {x} hidden?",
      "According to the text, where is the treasure of {x} hidden?",
      "Where was the treasure of {x} hidden?"]),
    ("{x} once said that {y}.",
     ["What did {x} once say?", "According to the text, what did {x} say?",
      "What is the thing that {x} once said?"]),
    ("The motto of {x} is {y}.",
     ["What is the motto of {x}?", "According to the text, what is the motto of {x}?",
      "Which motto does {x} have?"]),
]

# Classic NIAH needle (held out from training: San Francisco / Dolores Park never occur in the
# synthetic sentence needles).
CLASSIC_NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
CLASSIC_QUESTION = "What is the best thing to do in San Francisco?"


@dataclass
class Task:
    kind: str           # passkey | words | kv | sentence
    identity: str       # unique within a document
    needle: str
    question: str
    answer: str
    answer_prefix: str = ANSWER_PREFIX
    asked: bool = True  # kv distractors are inserted but not asked


# ----------------------------------------------------------------------------------------------
# Generators
# ----------------------------------------------------------------------------------------------

def rand_number(rng: random.Random, ndigits: int) -> str:
    return str(rng.randint(10 ** (ndigits - 1), 10 ** ndigits - 1))


def make_passkey(rng: random.Random, wording: int | None = None, ndigits: int = 5,
                 question: int | None = None) -> Task:
    w = rng.randrange(len(PASSKEY_WORDINGS)) if wording is None else wording
    tmpl, qs = PASSKEY_WORDINGS[w]
    n = rand_number(rng, ndigits)
    q = qs[rng.randrange(len(qs))] if question is None else qs[question]
    return Task("passkey", f"passkey{w}", tmpl.format(n=n), q, n)


def make_word_passkey(rng: random.Random, ordinal: int, nwords: int, duo_format: bool = False) -> Task:
    ordw = ORDINALS[ordinal]
    words = " ".join(rng.choice(NATO) for _ in range(nwords))
    if duo_format:  # DuoAttention multi_passkey10 format
        needle = WORD_PASSKEY_NEEDLES[0].format(ord=ordw, words=words)
        q = WORD_PASSKEY_QUESTIONS[1].format(ord=ordw)
        return Task("words", f"words{ordinal}", needle, q, words, answer_prefix=DUO_PASSKEY_PREFIX)
    needle = rng.choice(WORD_PASSKEY_NEEDLES).format(ord=ordw, words=words)
    q = rng.choice(WORD_PASSKEY_QUESTIONS).format(ord=ordw)
    return Task("words", f"words{ordinal}", needle, q, words)


def make_kv_group(rng: random.Random, n_pairs: int, n_asked: int) -> list[Task]:
    """n_pairs key-value needles in one wording with distinct keys; n_asked of them are asked."""
    w = rng.randrange(len(KV_WORDINGS))
    tmpl, qs = KV_WORDINGS[w]
    keys: set[str] = set()
    tasks = []
    numeric = rng.random() < 0.7
    while len(tasks) < n_pairs:
        if rng.random() < 0.7:
            k = f"{rng.choice(KV_ADJ)}-{rng.choice(KV_NOUN)}"
        else:
            k = "".join(rng.choice("0123456789abcdef") for _ in range(6))
        if k in keys:
            continue
        keys.add(k)
        v = rand_number(rng, rng.randint(4, 7)) if numeric else rng.choice(KV_NOUN + KV_ADJ)
        q = rng.choice(qs).format(k=k)
        tasks.append(Task("kv", f"kv:{k}", tmpl.format(k=k, v=v), q, v, asked=False))
    for t in rng.sample(tasks, min(n_asked, n_pairs)):
        t.asked = True
    return tasks


def make_sentence(rng: random.Random, template: int | None = None, slots: SlotSource | None = None,
                  easy: bool = False) -> Task:
    slots = slots or default_slots()
    while True:
        ti = rng.randrange(len(SENTENCE_TEMPLATES)) if template is None else template
        tmpl, qs = SENTENCE_TEMPLATES[ti]
        x = slots.proper(rng)
        if ti == 3:  # where the treasure is hidden
            y = f"{rng.choice(PREPS)} {slots.phrase(rng, rng.randint(2, 8 if easy else 16))}"
        else:
            y = slots.activity(rng, easy)
        dish = rng.choice(DISHES) if rng.random() < 0.5 else rng.choice(slots.plain)
        needle = tmpl.format(x=x, y=y, dish=dish)
        if not any(b in needle for b in BANNED_PHRASES):
            break
    q = rng.choice(qs).format(x=x, dish=dish)
    ident = f"sent{ti}:{x}" + (f":{dish}" if ti == 2 else "")
    return Task("sentence", ident, needle, q, needle)


def classic_sentence_task() -> Task:
    return Task("sentence", "classic", CLASSIC_NEEDLE, CLASSIC_QUESTION, CLASSIC_NEEDLE)


# Task mix: single-task documents (like the eval) and the kind weights of each needle.
SINGLE_TASK_SHARE = 0.35
SINGLE_KIND_WEIGHTS = [0.3, 0.15, 0.1, 0.45]  # passkey, words, kv, sentence
MULTI_KIND_WEIGHTS = [0.25, 0.15, 0.15, 0.45]


def sample_tasks(rng: random.Random, max_needles: int, easy: bool = False,
                 slots: SlotSource | None = None) -> list[Task]:
    """Tasks for one training document: single-task (like the eval) or several distinct tasks."""
    if max_needles <= 1 or rng.random() < SINGLE_TASK_SHARE:
        kind = rng.choices(["passkey", "words", "kv", "sentence"], SINGLE_KIND_WEIGHTS)[0]
        if kind == "passkey":
            return [make_passkey(rng, ndigits=rng.randint(3, 5) if easy else rng.randint(4, 7))]
        if kind == "words":
            return [make_word_passkey(rng, rng.randrange(10), rng.randint(2, 4) if easy else rng.randint(3, 8),
                                      duo_format=rng.random() < 0.2)]
        if kind == "kv":
            return make_kv_group(rng, 1, 1)
        return [make_sentence(rng, slots=slots, easy=easy)]
    n = rng.randint(2, max_needles)
    tasks: list[Task] = []
    pk_wordings = list(range(len(PASSKEY_WORDINGS)))
    rng.shuffle(pk_wordings)
    ordinals = list(range(10))
    rng.shuffle(ordinals)
    duo_fmt = rng.random() < 0.15
    sent_ids: set[str] = set()
    kv_used = False
    while len(tasks) < n:
        kind = rng.choices(["passkey", "words", "kv", "sentence"], MULTI_KIND_WEIGHTS)[0]
        if kind == "passkey" and pk_wordings:
            tasks.append(make_passkey(rng, wording=pk_wordings.pop(),
                                      ndigits=rng.randint(3, 5) if easy else rng.randint(4, 7)))
        elif kind == "words" and ordinals:
            tasks.append(make_word_passkey(rng, ordinals.pop(), rng.randint(2, 4) if easy else rng.randint(3, 8),
                                           duo_format=duo_fmt))
        elif kind == "kv" and not kv_used:
            kv_used = True
            np_ = rng.randint(2, max(2, min(8, n - len(tasks) + 2)))
            tasks.extend(make_kv_group(rng, np_, rng.randint(1, min(3, np_))))
        elif kind == "sentence":
            t = make_sentence(rng, slots=slots, easy=easy)
            if t.identity not in sent_ids:
                sent_ids.add(t.identity)
                tasks.append(t)
    return tasks


def format_example_text(haystack: str, tasks: list[Task], depths: list[float]) -> str:
    """Character-level rendering (for docs / inspection only; training works at token level)."""
    pos = sorted(((int(d * len(haystack)), t) for d, t in zip(depths, tasks)), key=lambda x: x[0])
    out, last = [], 0
    for p, t in pos:
        out.append(haystack[last:p])
        out.append(CANONICAL_SEP[0] + t.needle + CANONICAL_SEP[1])
        last = p
    out.append(haystack[last:])
    first = True
    for t in tasks:
        if not t.asked:
            continue
        out.append((QUESTION_PREFIX_FIRST if first else QUESTION_PREFIX_NEXT) + t.question +
                   t.answer_prefix + " " + t.answer + "\n")
        first = False
    return "".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-needles", type=int, default=6)
    ap.add_argument("--corpus", default=None,
                    help="directory of .txt files for the sentence slots (default: the built-in word lists)")
    ap.add_argument("--sentences", type=int, default=0, help="print this many sentence needles instead")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    slots = None
    if args.corpus:
        from pathlib import Path
        slots = SlotSource(" ".join(p.read_text(errors="replace") for p in sorted(Path(args.corpus).rglob("*.txt"))))
    if args.sentences:
        for _ in range(args.sentences):
            t = make_sentence(rng, slots=slots)
            print(f"{t.question}\n    {t.needle}")
        return
    hay = (FILLER * 8).strip()
    for i in range(args.examples):
        tasks = sample_tasks(rng, args.max_needles, slots=slots)
        depths = sorted(rng.random() for _ in tasks)
        print(f"===== example {i} =====")
        print(format_example_text(hay, tasks, depths))


if __name__ == "__main__":
    main()
