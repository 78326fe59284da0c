"""Stage: speed perturbation, as Kaldi's ``utils/data/perturb_data_dir_speed_3way.sh``.

``data/<source>_sp`` holds the source's utterances and a copy of each at every factor of
``perturb.speeds`` (0.9 and 1.1): ``sp0.9-<utt>`` of speaker ``sp0.9-<spk>``, with ``utt2uniq``
naming the utterance it was made from (so copies of validation speakers stay out of
training). A factor F plays the audio F times as fast, pitch included, like sox's ``speed``:
the samples are resampled by 1/F (polyphase, scipy) and written as 16-bit wavs under
``data/<source>_sp/wav/``; a Kaldi user's tools read the dir as it is. For each subset of
the source (``<source>_<pct>pct``), ``<source>_<pct>pct_sp`` is the same subset of the copies.

The copies then get features (``make-feats features.sets=[train_sp]``) and the triphone
GMM's alignment (``align features.sets=[train_sp]``): a hard-label baseline trained on them
is the fair comparison for a student trained on them.
"""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from asrkd import sections
from asrkd.data import DataDir, subset_name
from asrkd.drops import account_dropped
from asrkd.files import atomic_write
from asrkd.kaldi.features import read_waveform
from asrkd.progress import progress
from asrkd.stage import plan

log = logging.getLogger(__name__)


def change_speed(samples: np.ndarray, factor: float) -> np.ndarray:
    """The signal played ``factor`` times as fast: len / factor samples (sox ``speed factor``)."""
    ratio = Fraction(factor).limit_denominator(1000)
    return resample_poly(samples, ratio.denominator, ratio.numerator)


def perturbed_copy(data: DataDir, factor: float, wav_dir: Path) -> DataDir:
    """Ids and table entries of the copies at ``factor``; the audio is written by ``write_audio``."""
    prefix = f"sp{factor:g}-"
    copy = DataDir()
    for utt in data.utt_ids:
        new = prefix + utt
        copy.wav_scp[new] = str((wav_dir / f"{new}.wav").resolve())
        copy.text[new] = data.text[utt]
        copy.utt2spk[new] = prefix + data.utt2spk[utt]
        copy.utt2uniq[new] = data.source(utt)
    return copy


def run(cfg) -> None:
    """Stage: data/<source>_sp (audio at each speed, utt2uniq) and its subsets."""
    pcfg = cfg.perturb
    data_dir = Path(cfg.data_dir)
    source = data_dir / pcfg.source
    out_dir = data_dir / f"{pcfg.source}_sp"
    stage = plan(f"speed-perturb {pcfg.source}", out_dir, sections.settings(cfg, ("perturb", "features.sample_rate", "features.channel", "features.resample")),
                 {"data": source})
    if stage.up_to_date:
        return
    data = DataDir.read(source)
    wav_dir = out_dir / "wav"
    copies, dropped = [], {}
    for factor in pcfg.speeds:
        copy = perturbed_copy(data, float(factor), wav_dir)
        for utt, new in progress(list(zip(data.utt_ids, copy.utt_ids)), f"speed {factor:g}", unit="utterances"):
            try:
                samples = read_waveform(data.wav_scp[utt], utt, cfg.features.sample_rate, cfg.features.channel, cfg.features.resample)
            except ValueError as err:
                dropped[new] = str(err)
                continue
            with atomic_write(wav_dir / f"{new}.wav") as tmp:
                sf.write(tmp, np.clip(np.round(change_speed(samples, float(factor))), -32768, 32767).astype(np.int16),
                         int(cfg.features.sample_rate), format="WAV", subtype="PCM_16")
        copies.append(copy.subset([u for u in copy.utt_ids if u not in dropped]))
    account_dropped(f"speed-perturb {pcfg.source}", len(data.utt_ids) * len(pcfg.speeds), dropped, cfg.prep.max_drop_fraction,
                    out_dir / "dropped.json")
    perturbed = DataDir.combine(data, *copies)
    perturbed.write(out_dir)
    subsets = []
    for fraction in cfg.prep.subset_fractions if pcfg.source == "train" else []:
        subset_dir = data_dir / subset_name(fraction)
        if (subset_dir / "utt2spk").is_file():
            sources = set(DataDir.read(subset_dir).utt_ids)
            perturbed.subset([u for u in perturbed.utt_ids if perturbed.source(u) in sources]).write(data_dir / f"{subset_dir.name}_sp")
            subsets.append(f"{subset_dir.name}_sp")
    log.info("speed-perturb: %s has %d utterances (%d copies at %s); subsets %s", out_dir, len(perturbed.utt_ids),
             sum(len(c.utt_ids) for c in copies), list(pcfg.speeds), subsets)
    stage.commit(utterances=len(perturbed.utt_ids), dropped=len(dropped), subsets=subsets)
