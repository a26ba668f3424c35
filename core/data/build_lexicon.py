#!/usr/bin/env python3
"""Rebuild lexicon.tsv.gz, clipa's part-of-speech table for syntax masking.

Usage: python3 build_lexicon.py [WORDNET_DICT_DIR] [OUT]
       (defaults: /usr/share/wordnet, lexicon.tsv.gz beside this script)

Python 3.8+ standard library only. Input is WordNet 3.0's dict directory
(Debian/Ubuntu package `wordnet-base`): index.{noun,verb,adj,adv},
cntlist.rev, {noun,verb,adj}.exc. Output is gzip'd UTF-8 text, one
`word<TAB>class` line per surface form, class one of noun, adjective, verb,
other; `#` lines are comments. Words absent from the table count as other.

How a surface form w gets its class (a context-free stand-in for NLTK's
perceptron tagger, which CLIPA's syntax mask uses; CLIPA's JAX code also
tags each vocabulary entry alone):
1. Candidates are (lemma, POS) pairs: w itself where WordNet has it as a
   single-word lemma; the bases of w in the exception lists (men -> man,
   sitting -> sit); and regular inflections generated from every lemma
   (noun plurals; verb -s/-ed/-ing, no regular -ed for verbs whose past is
   irregular, so "seed" is not "see"+d; -er/-est of tagged adjectives).
   WordNet's POS map to classes: n -> noun, a and satellite s -> adjective,
   v -> verb, r (adverb) -> other.
2. Each class scores (highest tag_cnt of any of its senses, total tag_cnt,
   number of senses) over its candidates, compared in that order: the most
   frequent sense in the SemCor-tagged counts wins, and a word without tagged
   senses falls back to the POS with most senses. Remaining ties go to the
   earlier class in noun, adjective, verb, other.
3. When w is itself a tagged lemma, inflection readings count a third
   ("building" stays a noun although "build" is a frequent verb; "standing",
   "playing" still become verbs), because a caption word that WordNet lists
   on its own usually means that entry.
4. Closed-class words (determiners, pronouns, prepositions, conjunctions,
   modals, number words; Penn tags DT IN CC PRP WP MD CD ...) are written as
   `other`: WordNet lists some of them with rare senses ("a" vitamin A,
   "it" information technology, "two" as adjective) that NLTK never tags so.
Colour words come out as adjectives by rule 2 alone: their adjective sense
is tagged far more often than the noun (brown 38 vs 2, green 26 vs 6).
"""
import collections
import gzip
import os
import re
import sys

CLOSED = """
a an the this that these those each every some any no all both either neither another half such
about above across after against along alongside amid among around as at atop before behind below
beneath beside besides between beyond by despite down during except for from in inside into like
near of off on onto out outside over per since than through throughout till to toward towards under
underneath unlike until up upon via with within without whether if because while though although
unless whereas and or but nor yet plus
i me you he him she her it we us they them myself yourself himself herself itself ourselves
themselves my mine your yours his hers its our ours their theirs
what which who whom whose where when why how whatever whichever whoever
can could may might must shall should will would there
zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen
sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred
thousand million billion
""".split()

POS_FILES = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}
SS_TYPE = {"1": "n", "2": "v", "3": "a", "4": "r", "5": "a"}
CLASS = {"n": "noun", "a": "adjective", "v": "verb", "r": "other"}
ORDER = {"n": 0, "a": 1, "v": 2, "r": 3}
VOWELS = "aeiou"
WORD = re.compile(r"[a-z0-9][a-z0-9'./-]*")


def load(wn):
    senses = {}  # (lemma, pos) -> number of synsets
    for name, p in POS_FILES.items():
        with open(os.path.join(wn, "index." + name), encoding="latin-1") as f:
            for line in f:
                if line.startswith(" "):
                    continue
                fields = line.split()
                if "_" not in fields[0]:
                    senses[(fields[0], p)] = int(fields[2])
    top = collections.Counter()  # (lemma, pos) -> highest tag_cnt of a sense
    total = collections.Counter()  # (lemma, pos) -> summed tag_cnt
    with open(os.path.join(wn, "cntlist.rev"), encoding="latin-1") as f:
        for line in f:
            key, _, count = line.split()
            lemma, rest = key.split("%")
            k = (lemma, SS_TYPE[rest[0]])
            top[k] = max(top[k], int(count))
            total[k] += int(count)
    exc = []  # (form, base, pos)
    for name, p in [("noun", "n"), ("verb", "v"), ("adj", "a")]:
        with open(os.path.join(wn, name + ".exc"), encoding="latin-1") as f:
            for line in f:
                form, *bases = line.split()
                exc += [(form, b, p) for b in bases if "_" not in form]
    return senses, top, total, exc


def ends_consonant_y(w):
    return len(w) > 1 and w.endswith("y") and w[-2] not in VOWELS


def plurals(w):
    if w.endswith(("s", "x", "z", "ch", "sh")):
        return [w + "es"]
    if ends_consonant_y(w):
        return [w[:-1] + "ies"]
    if w.endswith("man"):
        return [w[:-3] + "men", w + "s"]
    return [w + "s"]


def verb_forms(w, irregular_past):
    out = [w + "s"] if w.endswith("man") else plurals(w)
    if w in irregular_past:
        pass
    elif w.endswith("e"):
        out.append(w + "d")
    elif ends_consonant_y(w):
        out.append(w[:-1] + "ied")
    else:
        out.append(w + "ed")
    if w.endswith("e") and not w.endswith(("ee", "ye", "oe", "ie")) and len(w) > 2:
        out.append(w[:-1] + "ing")
    elif not w.endswith("ie"):
        out.append(w + "ing")
    return out


def adj_forms(w):
    if w.endswith("e"):
        return [w + "r", w + "st"]
    if ends_consonant_y(w):
        return [w[:-1] + "ier", w[:-1] + "iest"]
    return [w + "er", w + "est"]


def classify_all(senses, top, total, exc):
    cand = collections.defaultdict(set)  # form -> {(lemma, pos, is_exact)}
    for lemma, p in senses:
        cand[lemma].add((lemma, p, True))
    irregular_past = set()
    for form, base, p in exc:
        if (base, p) in senses:
            cand[form].add((base, p, False))
        if p == "v" and not form.endswith(("ing", "s")):
            irregular_past.add(base)
    for lemma, p in senses:
        if not re.fullmatch(r"[a-z][a-z'-]*[a-z]", lemma):
            continue
        if p == "n":
            forms = plurals(lemma)
        elif p == "v":
            forms = verb_forms(lemma, irregular_past)
        elif p == "a" and top[(lemma, p)] > 0:
            forms = adj_forms(lemma)
        else:
            continue
        for form in forms:
            cand[form].add((lemma, p, False))
    table = {}
    for form, cs in cand.items():
        if not WORD.fullmatch(form):
            continue
        exact_tagged = any(exact and top[(l, p)] > 0 for l, p, exact in cs)
        best = {}
        for lemma, p, exact in cs:
            k = (lemma, p)
            w = 1.0 if exact or not exact_tagged else 1.0 / 3.0
            score = (top[k] * w, total[k] * w, senses.get(k, 0))
            best[p] = max(best.get(p, score), score)
        p = max(best, key=lambda p: (best[p], -ORDER[p]))
        if p != "r":
            table[form] = CLASS[p]
    for word in CLOSED:
        table[word] = "other"
    return table


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    wn = sys.argv[1] if len(sys.argv) > 1 else "/usr/share/wordnet"
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(here, "lexicon.tsv.gz")
    table = classify_all(*load(wn))
    lines = [
        "# clipa part-of-speech lexicon for syntax masking: word<TAB>noun|adjective|verb|other.\n",
        "# Built by build_lexicon.py from WordNet 3.0 (see WORDNET-LICENSE):\n",
        "# WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved.\n",
    ]
    # Grouped by class, then sorted: gzip compresses the repeated class names to nothing.
    rank = {c: ORDER[p] for p, c in CLASS.items()}
    rows = sorted(table.items(), key=lambda kv: (rank[kv[1]], kv[0]))
    lines += [f"{w}\t{c}\n" for w, c in rows]
    with open(out, "wb") as f:
        f.write(gzip.compress("".join(lines).encode("utf-8"), compresslevel=9, mtime=0))
    counts = collections.Counter(table.values())
    print(f"{out}: {len(table)} words, {dict(sorted(counts.items()))}")


if __name__ == "__main__":
    main()
