"""A built-in text corpus, generated deterministically, so small recipes and tests need no download.

The text is English-like: sentences from a small grammar over a few hundred common words,
arranged as stories, letters, notes, dialogues and reports of varying length, with numbers,
quotes and punctuation. It is not meaningful, but its token statistics are close enough to
real prose for a tiny GPT-2 to learn something measurable in a few hundred steps. The same
``seed`` always gives the same documents, on every platform (only Python's ``random.Random``).

``python -m flash_dist.data.corpus OUT_DIR`` writes it as one ``.txt`` file per document.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

__all__ = ["generate_corpus", "write_corpus"]

_NAMES = ("Ada Ben Clara Dmitri Elena Farid Greta Hugo Iris Jonas Kira Leo Mara Nils Olga Pavel Quinn Rosa "
          "Samir Tessa Ulrich Vera Walter Yara Zeno Anton Bea Cyrus Dora Emil Fiona Gil Hana Ivo Juno").split()
_PLACES = ("the harbour|the old mill|the northern valley|the market square|the library|the orchard|the station|"
           "the lighthouse|the river bank|the workshop|the village school|the mountain pass|the bakery|"
           "the town hall|the garden|the bridge|the forest road|the museum|the quiet lake|the hospital").split("|")
_NOUNS = ("house door window river letter morning evening winter summer garden road book lamp table city field "
          "bird horse boat bridge mountain storm rain wind fire stone tree forest child teacher doctor farmer "
          "baker sailor painter engineer student friend neighbour stranger clock bell map key box coat hat "
          "bread apple cup song story question answer problem machine wheel engine paper pen plan idea voice "
          "light shadow island market village street wall roof garden gate path hill valley shore wave ship "
          "train ticket coin basket candle mirror picture newspaper radio kitchen cellar tower meadow harvest").split()
_ADJ = ("old young quiet bright dark cold warm small large heavy light early late strange careful patient "
        "tired happy serious gentle sudden narrow wide empty full green grey golden silver broken simple "
        "clever honest proud calm busy distant familiar hidden open pale rough smooth steady thin wooden").split()
_ADV = ("slowly quickly quietly carefully suddenly finally often rarely gently clearly nearly almost "
        "softly firmly eagerly calmly patiently already again later soon").split()
# (present, past) pairs for transitive verbs
_VERBS = [v.split("/") for v in (
    "find/found carry/carried open/opened close/closed paint/painted build/built repair/repaired "
    "watch/watched follow/followed remember/remembered forget/forgot read/read write/wrote see/saw "
    "hear/heard bring/brought keep/kept lose/lost sell/sold buy/bought clean/cleaned draw/drew "
    "count/counted lift/lifted move/moved hide/hid fold/folded mend/mended measure/measured "
    "visit/visited describe/described answer/answered study/studied").split()]
_INTRANS = [v.split("/") for v in (
    "walk/walked wait/waited sleep/slept laugh/laughed listen/listened arrive/arrived leave/left "
    "return/returned work/worked rest/rested sing/sang smile/smiled travel/travelled speak/spoke "
    "run/ran stay/stayed wonder/wondered hurry/hurried").split()]
_CONNECT = ("and then|but|because|while|although|so|until|after|before|when").split("|")
_OPENERS = ("In the morning|Later that day|Some years ago|At first|Without a word|By the evening|"
            "For a long time|Every winter|On the third day|Just before noon|Near the end|Once again").split("|")
_TITLES = ("A Letter from {place}|The {adj} {noun}|Notes on the {noun}|{name} and the {noun}|"
           "A Report from {place}|Conversations at {place}|The {noun} of {name}|What {name} Found").split("|")
_UNITS = ("metres kilometres kilograms litres hours days weeks coins boxes sheep baskets").split()


def _third_person(verb: str) -> str:
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    if verb.endswith(("s", "sh", "ch", "x", "o")):
        return verb + "es"
    return verb + "s"


class _Writer:
    def __init__(self, rng: random.Random) -> None:
        self.r = rng

    def pick(self, seq):
        return self.r.choice(seq)

    def np(self) -> str:
        """A noun phrase."""
        r = self.r.random()
        if r < 0.2:
            return self.pick(_NAMES)
        det = self.pick(("the", "the", "a", "her", "his", "their", "that"))
        words = [self.pick(_ADJ), self.pick(_NOUNS)] if self.r.random() < 0.5 else [self.pick(_NOUNS)]
        if det == "a" and words[0][0] in "aeiou":
            det = "an"
        return " ".join([det, *words])

    def clause(self, past: bool = True) -> str:
        transitive = self.r.random() < 0.6
        present, past_form = self.pick(_VERBS if transitive else _INTRANS)
        verb = past_form if past else _third_person(present)  # every subject is singular
        out = f"{self.np()} {verb}"
        if transitive:
            out += f" {self.np()}"
        if self.r.random() < 0.3:
            out += f" {self.pick(_ADV)}"
        if self.r.random() < 0.35:
            out += f" near {self.pick(_PLACES)}"
        return out

    def sentence(self, past: bool = True) -> str:
        parts = []
        if self.r.random() < 0.25:
            parts.append(self.pick(_OPENERS) + ",")
        parts.append(self.clause(past))
        if self.r.random() < 0.4:
            parts.append(self.pick(_CONNECT))
            parts.append(self.clause(past))
        text = " ".join(parts)
        end = "." if self.r.random() < 0.9 else self.pick(("!", "?", "..."))
        return text[0].upper() + text[1:] + end

    def paragraph(self, n: int, past: bool = True) -> str:
        return " ".join(self.sentence(past) for _ in range(n))

    def number_fact(self) -> str:
        amount = self.r.randint(2, 9999)
        unit = self.pick(_UNITS)
        year = self.r.randint(1820, 1990)
        return self.pick((
            f"In {year} the village counted {amount} {unit}.",
            f"The {self.pick(_NOUNS)} measured {amount / 10:.1f} {unit} across.",
            f"By {year}, {amount:,} {unit} had been recorded near {self.pick(_PLACES)}.",
            f"About {self.r.randint(2, 99)}% of the {self.pick(_NOUNS)}s were {self.pick(_ADJ)}.",
        ))


def _document(w: _Writer) -> str:
    r = w.r
    title = w.pick(_TITLES).format(place=w.pick(_PLACES).title(), adj=w.pick(_ADJ).title(),
                                   noun=w.pick(_NOUNS).title(), name=w.pick(_NAMES))
    kind = r.randrange(5)
    lines = [title, ""]
    if kind == 0:  # story
        for _ in range(r.randint(2, 7)):
            lines += [w.paragraph(r.randint(3, 8)), ""]
    elif kind == 1:  # letter
        lines += [f"Dear {w.pick(_NAMES)},", ""]
        for _ in range(r.randint(2, 4)):
            lines += [w.paragraph(r.randint(2, 5), past=r.random() < 0.5), ""]
        lines += [w.pick(("Yours truly,", "With warm regards,", "Until soon,")), w.pick(_NAMES), ""]
    elif kind == 2:  # notes
        lines += [w.paragraph(r.randint(1, 3)), ""]
        for i in range(r.randint(3, 9)):
            lines.append(f"{i + 1}. {w.sentence(past=False)}")
        lines.append("")
    elif kind == 3:  # dialogue
        speakers = r.sample(_NAMES, 2)
        for _ in range(r.randint(4, 12)):
            said = w.pick(("said", "asked", "replied", "whispered", "answered"))
            line = w.sentence(past=False)
            line = line[:-1] + "," if line.endswith(".") and not line.endswith("...") else line
            lines.append(f'"{line}" {said} {w.pick(speakers)}.')
        lines += ["", w.paragraph(r.randint(1, 3)), ""]
    else:  # report
        for _ in range(r.randint(2, 5)):
            facts = " ".join(w.number_fact() for _ in range(r.randint(1, 3)))
            lines += [f"{w.paragraph(r.randint(1, 3))} {facts}", ""]
    return "\n".join(lines).rstrip() + "\n"


def generate_corpus(num_documents: int = 400, seed: int = 0) -> list[str]:
    """``num_documents`` documents (about 0.85 KB each on average: the default is ~340 KB)."""
    if num_documents < 1:
        raise ValueError(f"num_documents must be >= 1, got {num_documents}")
    w = _Writer(random.Random(seed))
    return [_document(w) for _ in range(num_documents)]


def write_corpus(out_dir: str | Path, num_documents: int = 400, seed: int = 0) -> list[Path]:
    """Write :func:`generate_corpus` as ``doc_00000.txt``, ... under ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, text in enumerate(generate_corpus(num_documents, seed)):
        path = out / f"doc_{i:05d}.txt"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--num-documents", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = write_corpus(args.out_dir, args.num_documents, args.seed)
    print(f"wrote {len(paths)} documents to {args.out_dir}")


if __name__ == "__main__":
    main()
