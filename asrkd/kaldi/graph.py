"""Stage: the decoding graph HCLG (Kaldi's utils/mkgraph.sh) and its n-gram LM.

The LM is a Kneser-Ney ARPA model trained on the training transcripts by ``kaldingram``
(AN4's own an4.lm covers only 13 digit words). Every FST operation is Kaldi/OpenFst code
from the pinned wheels:

  G     = kaldilm.arpa2fst(ARPA, #0 on back-off arcs)
  LG    = minimize(determinize*(L_disambig o G))
  CLG   = compose_context(LG)                      (triphone context, ilabels = phone windows)
  HCLGa = determinize*(H o CLG), disambiguation transition-ids -> epsilon, minimize
  HCLG  = add_self_loops(HCLGa, self_loop_scale)
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kaldi_hmm_gmm as khg  # noqa: F401  (import order: kaldi_hmm_gmm, then kaldi_decoder, then kaldilm)
import kaldifst

from asrkd import sections
from asrkd.data import Split, read_table
from asrkd.files import atomic_write, copy_file, file_digest, write_text
from asrkd.kaldi.gmm_model import GmmModel
from asrkd.kaldi.lang import Lang, dictionary_digest, read_symbol_table, with_words
from asrkd.stage import input_record, plan

log = logging.getLogger(__name__)


def lm_text(transcripts: dict[str, str], lang: Lang) -> tuple[list[str], dict[str, str]]:
    """Sentences for the LM: those whose words all have pronunciations (the rest are reported)."""
    sentences, dropped = [], {}
    for utt, text in sorted(transcripts.items()):
        unknown = [w for w in text.split() if w not in lang.words]
        if unknown:
            dropped[utt] = f"utterance {utt}: words without pronunciation {unknown}"
        else:
            sentences.append(text)
    return sentences, dropped


def lm_exclusions(exclude: bool, tuning_set: str, split: Split) -> set[str]:
    """The utterances whose sentences the LM must not see (``exclude``: ``graph.lm_exclude_valid``):
    those of the set that chooses the LM weight (``decode.tuning_set``): the validation speakers'
    (``split``) when it is ``valid``, else the utterances of that data dir."""
    if not exclude:
        return set()
    if tuning_set == "valid":
        return set(split.utterances()[1])
    return set(read_table(split.data_dir / tuning_set / "text"))


GRAPH_KEYS = ("graph.lm_data", "graph.lm_exclude_valid", "graph.lm_order", "graph.transition_scale", "graph.self_loop_scale",
              "seed", "train.valid_fraction")
GRAPH_OPTIONAL_KEYS = {"decode.tuning_set": "valid", "graph.lm_arpa": None, "graph.lm_text": []}  # recorded when set: older graphs stay current


NO_PRONUNCIATION = "in the LM, without a usable pronunciation"


@dataclass(frozen=True)
class LanguageModel:
    """The LM of the graph in ``graph_dir`` as the ``graph`` section (``options``) asks for it."""

    graph_dir: Path
    options: Any

    @property
    def arpa(self) -> Path:
        """The graph's LM: a copy of the user's ARPA (``graph.lm_arpa``), or the one trained on ``graph.lm_data``."""
        return self.graph_dir / ("lm.arpa" if self.options.lm_arpa else f"lm_{int(self.options.lm_order)}gram.arpa")

    def vocabulary(self) -> set[str]:
        """The words the graph can output: its LM's unigrams that its lexicon (words.txt) holds. A
        lexicon word the LM never saw has no arc in G, nor an LM word without a pronunciation."""
        if not self.arpa.is_file():
            raise FileNotFoundError(f"{self.arpa}: no LM; run make-graph")
        return arpa_unigrams(self.arpa) & set(read_symbol_table(self.graph_dir / "words.txt"))

    def description(self) -> str:
        """Which LM the graph decodes with, in words (the report's): the user's ARPA with its order, or
        the n-gram trained here and on what."""
        options = self.options
        if options.lm_arpa:
            return f"the ARPA LM {options.lm_arpa} ({arpa_order(self.arpa)}-gram, graph.lm_arpa)"
        extra = f" and {len(options.lm_text)} text file{'s' if len(options.lm_text) > 1 else ''} (graph.lm_text)" if options.lm_text else ""
        left_out = ", the tuning set's sentences left out" if options.lm_exclude_valid else ""
        return f"a {int(options.lm_order)}-gram LM trained on {options.lm_data}'s transcripts{extra}{left_out}"

    def words_left_out(self) -> dict[str, str]:
        """The LM's words the graph cannot output (make-graph left them out of the decoding lang), each
        with make-graph's reason: no pronunciation in the dictionary or CMUdict, or one on phones
        outside the acoustic model's phone set."""
        outside = arpa_unigrams(self.arpa) - set(read_symbol_table(self.graph_dir / "words.txt"))
        recorded = input_record(self.graph_dir)["summary"].get("lm_words_left_out") or {}
        return {word: f"{NO_PRONUNCIATION} ({recorded[word]})" if word in recorded else NO_PRONUNCIATION for word in sorted(outside)}


def language_model(cfg) -> LanguageModel:
    """The graph's LM as ``cfg`` asks for it (``exp_dir``, ``graph.*``)."""
    return LanguageModel(sections.layout(cfg).graph, cfg.graph)


def arpa_unigrams(path: Path) -> set[str]:
    """The words of an ARPA file's 1-grams, without the sentence marks and <unk>."""
    words, unigrams = set(), False
    with open(path, encoding="utf-8") as arpa:
        for line in arpa:
            line = line.strip()
            if line == "\\1-grams:":
                unigrams = True
            elif unigrams and (not line or line.startswith("\\")):
                break
            elif unigrams:
                words.add(line.split()[1])
    return words - {"<s>", "</s>", "<unk>", "<UNK>"}


def arpa_order(path: Path) -> int:
    """An ARPA file's n-gram order: the highest n its \\data\\ header counts."""
    with open(path, encoding="utf-8") as arpa:
        orders = [int(line.split("=")[0].split()[1]) for line in arpa if line.startswith("ngram ")]
    return max(orders)


def train_arpa(sentences: list[str], order: int, out_dir: Path) -> Path:
    """Kneser-Ney n-gram ARPA via kaldingram (SRILM-compatible discounting), in a process of its
    own: its tqdm progress bars are off there (tqdm reads TQDM_DISABLE when it is first imported,
    which in this process was long before), and what it prints goes to the log."""
    text = out_dir / "lm_text.txt"
    write_text(text, "".join(s + "\n" for s in sentences))
    arpa = out_dir / f"lm_{order}gram.arpa"
    with atomic_write(arpa) as tmp:
        done = subprocess.run([sys.executable, "-m", "kaldingram.train", "--ngram-order", str(order), "--text", str(text), "--lm", str(tmp)],
                              capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        for line in (done.stdout + done.stderr).splitlines():
            log.debug("kaldingram: %s", line)
        if done.returncode != 0:
            raise RuntimeError(f"kaldingram could not train the LM on {text}: {(done.stderr.strip().splitlines() or ['exit ' + str(done.returncode)])[-1]}")
    return arpa


# kaldilm's arpa2fst in a process of its own: it aborts the process on a bad ARPA line, and its
# progress messages go to the log, not the terminal (import order: kaldilm hangs when imported before kaldi_decoder)
ARPA2FST = ("import sys, kaldi_hmm_gmm, kaldi_decoder, kaldilm; "
            "kaldilm.arpa2fst(input_arpa=sys.argv[1], output_fst=sys.argv[2], disambig_symbol='#0', read_symbol_table=sys.argv[3])")


def arpa_to_g(arpa: Path, words_txt: Path, out: Path) -> kaldifst.StdVectorFst:
    """G.fst of ``arpa`` over ``words_txt`` (#0 on the back-off arcs). kaldilm's messages are
    logged at DEBUG (its warnings at WARNING); a file it cannot read is an error naming the
    file and kaldilm's complaint."""
    with atomic_write(out) as tmp:
        done = subprocess.run([sys.executable, "-c", ARPA2FST, str(arpa), str(tmp), str(words_txt)], capture_output=True, text=True)
        for line in (done.stdout + done.stderr).splitlines():
            log.log(logging.WARNING if line.startswith("[W]") else logging.DEBUG, "arpa2fst %s: %s", arpa.name, line)
        if done.returncode != 0:
            complaint = [line for line in done.stderr.splitlines() if line.startswith("[E]")] or done.stderr.splitlines()[-1:]
            raise ValueError(f"{arpa}: kaldilm cannot read it as an ARPA LM over {words_txt} ({'; '.join(complaint) or f'exit {done.returncode}'}); "
                             "fix the file (graph.lm_arpa) or leave graph.lm_arpa null for the LM trained here")
    return kaldifst.StdVectorFst.read(str(out))


def relabel_to_epsilon(fst: kaldifst.StdVectorFst, labels: set[int]) -> None:
    """fstrmsymbols: the disambiguation transition-ids become epsilon on the input side."""
    for state in range(fst.num_states):
        arcs = list(kaldifst.ArcIterator(fst, state))
        if not any(arc.ilabel in labels for arc in arcs):
            continue
        fst.delete_arcs(state, len(arcs))
        for arc in arcs:
            ilabel = 0 if arc.ilabel in labels else arc.ilabel
            fst.add_arc(state=state, arc=kaldifst.StdArc(ilabel=ilabel, olabel=arc.olabel, weight=arc.weight, nextstate=arc.nextstate))


def make_hclg(lang: Lang, model: GmmModel, g: kaldifst.StdVectorFst, self_loop_scale: float, transition_scale: float) -> kaldifst.StdVectorFst:
    lexicon = lang.lexicon_fst(disambig=True)
    kaldifst.arcsort(lexicon, sort_type="olabel")
    kaldifst.arcsort(g, sort_type="ilabel")
    lg = kaldifst.compose(lexicon, g)
    kaldifst.determinize_star(lg, use_log=True)  # returns True only when stopped at max_states (none set)
    kaldifst.minimize_encoded(lg)
    clg, ilabels = kaldifst.compose_context(
        disambig_syms=lang.disambig_ids, context_width=model.tree.context_width,
        central_position=model.tree.central_position, ifst=lg,
    )
    kaldifst.arcsort(clg, sort_type="ilabel")
    h, disambig_tids = khg.get_h_transducer(
        ilabel_info=ilabels, ctx_dep=model.tree, trans_model=model.trans_model,
        config=khg.HTransducerConfig(transition_scale=transition_scale),
    )
    hclg = kaldifst.compose(h, clg)
    kaldifst.determinize_star(hclg, use_log=True)
    relabel_to_epsilon(hclg, set(disambig_tids))
    kaldifst.minimize_encoded(hclg)
    return khg.add_self_loops(self_loop_scale=self_loop_scale, disambig_syms=[], reorder=True, trans_model=model.trans_model, ifst=hclg)


def run(cfg) -> None:
    """Stage 5: the LM and HCLG. The LM is the user's ARPA (``graph.lm_arpa``), or an n-gram
    trained on ``graph.lm_data``'s transcripts (the tuning set's sentences left out) and the
    text files of ``graph.lm_text``; its words that the training lang lacks join a decoding
    lang (``exp/graph/lang``, Kaldi's lang_test: the acoustic model's phones, the larger
    vocabulary), so the vocabulary grows without touching the acoustic model."""
    layout, gcfg = sections.layout(cfg), cfg.graph
    out_dir = layout.graph
    data_dir = layout.data
    tuning = str(cfg.decode.tuning_set)
    user_arpa = Path(gcfg.lm_arpa) if gcfg.lm_arpa else None
    extra_text = [Path(p) for p in gcfg.lm_text]
    lm_files = [*([user_arpa] if user_arpa else []), *extra_text]
    for path in lm_files:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (graph.lm_arpa / graph.lm_text; relative paths are from the recipe dir)")
    inputs = {"lang": layout.lang, "model": layout.gmm, "lm data": data_dir / gcfg.lm_data, "split": data_dir / "train",
              **({"tuning set": layout.data_dir(tuning)} if tuning != "valid" else {})}
    files = {str(path): file_digest(path) for path in lm_files}  # what the LM is made from
    if files:  # the decoding lexicon then takes pronunciations from the dictionary too
        files["dict"] = dictionary_digest(layout.dictionary)
    stage = plan("make-graph", out_dir, sections.settings(cfg, GRAPH_KEYS), inputs, sections.optional_values(cfg, GRAPH_OPTIONAL_KEYS) | ({"lm_files": files} if files else {}))
    if stage.up_to_date:
        return
    trained, lm = Lang.load(layout.lang), language_model(cfg)
    if user_arpa:
        copy_file(user_arpa, lm.arpa)
        wanted = arpa_unigrams(user_arpa)
        texts: dict[str, str] = {}
    else:
        transcripts = read_table(data_dir / gcfg.lm_data / "text")
        excluded = lm_exclusions(bool(gcfg.lm_exclude_valid), tuning, sections.split(cfg))  # the set that chooses the LM weight: keep its text unseen
        texts = {u: t for u, t in transcripts.items() if u not in excluded}
        texts |= {f"{path}:{n}": line.strip() for path in extra_text
                  for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()}
        wanted = {w for text in texts.values() for w in text.split()}
    lang, missing = with_words(cfg.lang, layout.dictionary, trained, wanted, layout.decoding_lang)
    if missing:
        log.warning("make-graph: %d LM word(s) without a usable pronunciation are left out of the graph (%s), e.g. %s",
                    len(missing), next(iter(missing.values())), " ".join(sorted(missing)[:10]))
    sentences, dropped = ([], {}) if user_arpa else lm_text(texts, lang)
    if dropped:
        log.warning("make-graph: %d LM sentences left out (%s)", len(dropped), next(iter(dropped.values())))
    arpa = lm.arpa if user_arpa else train_arpa(sentences, gcfg.lm_order, out_dir)
    g = arpa_to_g(arpa, lang.directory / "words.txt", out_dir / "G.fst")
    model = GmmModel.load(layout.gmm)
    hclg = make_hclg(lang, model, g, cfg.graph.self_loop_scale, cfg.graph.transition_scale)
    with atomic_write(out_dir / "HCLG.fst") as tmp:
        hclg.write(str(tmp))
    write_text(out_dir / "words.txt", (lang.directory / "words.txt").read_text())
    log.info("make-graph: %s; %d words; HCLG has %d states", f"the LM {user_arpa}" if user_arpa else
             f"{gcfg.lm_order}-gram LM from {len(sentences)} sentences", len(lang.words), hclg.num_states)
    stage.commit(lm_sentences=len(sentences), lm_sentences_dropped=len(dropped), hclg_states=hclg.num_states,
                 **({"words_added": len(lang.words) - len(trained.words), "lm_words_left_out": dict(sorted(missing.items()))} if lm_files else {}))
