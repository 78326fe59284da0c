"""A tiny end-to-end run on a handful of AN4 speakers: prep -> lang -> features -> GMM -> DNN -> report."""

import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from asrkd.kaldi import gmm
from asrkd.kaldi.decode import best_words, decode_lattice, transition_id_matrix
from asrkd.nnet import decode

from asrkd import sections
from asrkd.cli import load_config
from asrkd.drops import TooManyDropped, account_dropped
from asrkd.nnet import train
from asrkd.nnet.checkpoints import read_history
from asrkd.stores import FeatureStore
from local import an4 as an4_prep

from conftest import (TINY, assert_drawn, assert_p_above_zero_agrees, frame_accuracy_by_argmax, majority_pdf_rate, make_mini_an4,
                       wer_from_hypotheses)

def test_report_has_frame_accuracy_for_every_set(run_dir: Path) -> None:
    report = json.loads((run_dir / "exp" / "report" / "report.json").read_text())
    accuracy = report["systems"]["baseline"]["frame_accuracy"]
    assert set(accuracy) == {"train", "valid", "test"}
    num_pdfs = report["gmm"]["tri_pdfs"]
    assert report["gmm"]["mono_pdfs"] < num_pdfs <= 130  # the tree split contexts, within max_leaves
    exp = run_dir / "exp"
    assert accuracy["test"] == pytest.approx(frame_accuracy_by_argmax(exp, "baseline"), abs=1e-9)  # counted a second way
    assert accuracy["test"] > 3 * majority_pdf_rate(exp)  # a model that learned only the prior reaches 1x
    markdown = (run_dir / "exp" / "report" / "report.md").read_text()
    assert "| baseline | 2x64 | 1 |" in markdown
    scored = report["frame_accuracy_utterances"]["test"]  # every frame-accuracy cell: over how many utterances
    assert 0 < scored["aligned"] <= scored["of"] and f"test {scored['aligned']:,} of {scored['of']:,}" in markdown
    oov = report["out_of_vocabulary"]  # words the LM (trained on train's transcripts) cannot output
    assert set(oov) == {"valid", "test"} and 0.0 <= oov["test"]["oov_rate"] < 0.5 and "Out of the LM's vocabulary" in markdown
    baseline = report["systems"]["baseline"]
    lo, hi = baseline["frame_accuracy_ci"]["test"]
    assert lo < baseline["frame_accuracy"]["test"] < hi and baseline["wer_ci"]["test"][0] <= baseline["wer"]["test"]
    assert baseline["stage"]["baseline"]["config"]["model.hidden_dim"] == 64  # the config it was made with
    assert len(baseline["stage"]["baseline"]["fingerprint"]) == 16
    for system in ("gmm", "baseline"):
        wer = report["systems"][system]["wer"]
        assert set(wer) == {"test", "test_unseen", "valid"} and wer["test"] == pytest.approx(wer_from_hypotheses(run_dir, system))
        assert wer["valid"] == pytest.approx(wer_from_hypotheses(run_dir, system, "valid")) and wer["test"] < 0.75  # an empty decode: 1.0
        assert report["systems"][system]["lmwt"] in range(6, 18)


def test_a_known_state_sequence_decodes_to_its_words(run_dir: Path) -> None:
    import kaldifst

    from asrkd.data import DataDir
    from asrkd.kaldi.gmm_model import GmmModel
    from asrkd.kaldi.lang import read_symbol_table

    exp = run_dir / "exp"
    hclg = kaldifst.StdVectorFst.read(str(exp / "graph" / "HCLG.fst"))
    model = GmmModel.load(exp / "tri")
    id2word = {i: w for w, i in read_symbol_table(exp / "graph" / "words.txt").items()}
    store = FeatureStore.load(exp / "feats" / "mfcc" / "test")
    pdf_ids = np.load(exp / "tri" / "ali_test" / "pdf_ids.npy")
    text = DataDir.read(run_dir / "data" / "test").text
    for utt in store.utt_ids[:3]:
        start, end = store.span(utt)
        scores = np.full((end - start, model.num_pdfs), -20.0, dtype=np.float32)
        scores[np.arange(end - start), pdf_ids[start:end]] = 0.0  # the forced alignment's states win every frame
        lattice = decode_lattice(hclg, transition_id_matrix(scores, model.tid_to_pdf(), 0.1), 13.0, 6.0)
        assert " ".join(id2word[w] for w in best_words(lattice, 10.0, 0.1)) == text[utt]


def test_alignment_covers_every_frame_of_every_aligned_utterance(run_dir: Path) -> None:
    for name in ("train", "test"):
        store = FeatureStore.load(run_dir / "exp" / "feats" / "mfcc" / name)
        ali = run_dir / "exp" / "tri" / f"ali_{name}"
        pdf_ids, tids = np.load(ali / "pdf_ids.npy"), np.load(ali / "transition_ids.npy")
        assert len(pdf_ids) == len(tids) == store.num_frames
        num_pdfs = json.loads((ali / "index.json").read_text())["num_pdfs"]
        dropped = json.loads((ali / "dropped.json").read_text())["dropped"]
        for utt in store.utt_ids:
            start, end = store.span(utt)
            if utt in dropped:
                assert (pdf_ids[start:end] == -1).all()
            else:
                assert ((pdf_ids[start:end] >= 0) & (pdf_ids[start:end] < num_pdfs)).all()
                assert (tids[start:end] > 0).all()
        assert pdf_ids.max() < num_pdfs


def test_bad_input_is_dropped_with_reasons(run_dir: Path) -> None:
    prep = json.loads((run_dir / "data" / "local" / "dropped_train.json").read_text())
    assert len(prep["dropped"]) == 1 and "missing audio" in next(iter(prep["dropped"].values()))
    mono = json.loads((run_dir / "exp" / "mono" / "dropped.json").read_text())
    (utt, reason), = mono["dropped"].items()
    assert "QWERTYZZ" in reason and utt in reason


def test_too_many_dropped_fails_the_stage(tmp_path: Path) -> None:
    """Past prep.max_drop_fraction a stage fails; at it, it goes on (the limit is the share allowed)."""
    with pytest.raises(TooManyDropped, match="dropped 2 of 10"):
        account_dropped("x", 10, {"a": "utterance a: why", "b": "utterance b: why"}, 0.1, tmp_path / "d.json")
    account_dropped("x", 10, {"a": "utterance a: why"}, 0.1, tmp_path / "d.json")
    assert json.loads((tmp_path / "d.json").read_text())["dropped"] == {"a": "utterance a: why"}


def test_a_set_only_scored_never_fails_alignment_and_says_what_it_lost(run_dir: Path, tmp_path: Path) -> None:
    import shutil

    from asrkd.kaldi import features

    shutil.copytree(run_dir / "data", tmp_path / "data", symlinks=True)
    shutil.copytree(run_dir / "exp", tmp_path / "exp", symlinks=True)
    text = (tmp_path / "data" / "test" / "text").read_text().splitlines()
    spoiled = [line.split()[0] for line in text[:3]]
    (tmp_path / "data" / "test" / "text").write_text("".join(f"{line.split()[0]} QWERTYZZ\n" if i < 3 else f"{line}\n" for i, line in enumerate(text)))
    cfg = load_config([f"data_dir={tmp_path}/data", f"exp_dir={tmp_path}/exp", *TINY, "redo=true", "features.sets=[test]"])
    assert 3 > 0.05 * len(text)  # past prep.max_drop_fraction, which would stop a training set's alignment
    features.run(cfg)  # its text changed: its features' record too
    gmm.run_align(cfg)  # test is an eval set: counted and named, not fatal
    dropped = json.loads((tmp_path / "exp" / "tri" / "ali_test" / "dropped.json").read_text())
    assert sorted(dropped["dropped"]) == sorted(spoiled) and all("QWERTYZZ" in reason for reason in dropped["dropped"].values())


def test_a_set_only_scored_never_fails_make_feats_and_says_what_it_lost(run_dir: Path, tmp_path: Path) -> None:
    """Missing audio in a set only scored (named in eval_sets) is counted and listed, never fatal:
    it trains nothing; the same set made for training stops at prep.max_drop_fraction."""
    import shutil

    from asrkd.drops import TooManyDropped
    from asrkd.kaldi import features

    shutil.copytree(run_dir / "data", tmp_path / "data", symlinks=True)
    shutil.copytree(run_dir / "exp", tmp_path / "exp", symlinks=True)
    extra = tmp_path / "data" / "extra"
    shutil.copytree(tmp_path / "data" / "test", extra, symlinks=True)
    lines = (extra / "wav.scp").read_text().splitlines()
    lost = [line.split()[0] for line in lines[:3]]
    (extra / "wav.scp").write_text("".join(f"{line.split()[0]} {tmp_path}/gone.wav\n" if i < 3 else f"{line}\n" for i, line in enumerate(lines)))
    assert 3 > 0.05 * len(lines)
    common = [f"data_dir={tmp_path}/data", f"exp_dir={tmp_path}/exp", *TINY, "features.sets=[extra]"]
    with pytest.raises(TooManyDropped, match=r"make-feats fbank extra: dropped 3 of"):
        features.run(load_config(common))  # not scored: as a training set would be
    features.run(load_config([*common, "eval_sets=[test,extra]", "redo=true"]))
    dropped = json.loads((tmp_path / "exp" / "feats" / "fbank" / "extra" / "dropped.json").read_text())
    assert sorted(dropped["dropped"]) == sorted(lost) and "scored only" in dropped["stage"]
    # every utterance left fails alignment (a word no lexicon spells): counted, and scored by WER alone, not a crash
    text = (extra / "text").read_text().splitlines()
    (extra / "text").write_text("".join(f"{line.split()[0]} QWERTYZZ\n" for line in text))
    scored = [*common, "eval_sets=[test,extra]", "redo=true"]
    features.run(load_config(scored))
    gmm.run_align(load_config(scored))
    from asrkd.evaluate import Evaluation

    evaluation = Evaluation(load_config([*common, "eval_sets=[test,extra]"]))
    assert "extra" not in evaluation.frames_by_set and "extra" in evaluation.words_by_set and "test" in evaluation.frames_by_set
    from asrkd import evaluate
    from asrkd.errors import StageError

    with pytest.raises(StageError, match=r"decode/baseline has not decoded extra: run `asrkd decode` with the same eval_sets=\['test', 'extra'\]"):
        evaluate.run(load_config([*common, "eval_sets=[test,extra]"]))  # named, not decoded yet: one line with the fix


def test_finished_stages_are_skipped(run_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config([f"data_dir={run_dir}/data", f"exp_dir={run_dir}/exp", *TINY])
    caplog.set_level(logging.INFO)
    gmm.run(cfg)
    train.run(cfg)
    decode.run(cfg)
    for stage in ("train-gmm", "align train", "train-dnn baseline", "decode baseline"):
        assert f"{stage}: " in caplog.text
    assert caplog.text.count("is complete and current, skipping") == 6  # tri, ali_train, ali_test, baseline, 2 decodes


def test_download_unpacks_an_archive(an4: Path, tmp_path: Path) -> None:
    corpus = make_mini_an4(an4, tmp_path / "src" / "an4", train_speakers=1, test_speakers=1)
    archive = tmp_path / "an4_sphere.tar.gz"
    with tarfile.open(archive, "w:gz", dereference=True) as tar:
        tar.add(corpus, arcname="an4")
    root = an4_prep.download_an4(archive.as_uri(), tmp_path / "downloads")
    assert root == tmp_path / "downloads" / "an4"
    data, dropped = an4_prep.read_split(root, "train")
    assert len(data.utt2spk) > 5 and not dropped


def test_gmm_stage_is_reproducible(run_dir: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(run_dir / "data", tmp_path / "data")  # stage records name their inputs relative to themselves
    shutil.copytree(run_dir / "exp" / "feats", tmp_path / "exp" / "feats")
    cfg = load_config([f"data_dir={tmp_path}/data", f"exp_dir={tmp_path}/exp", *TINY, "jobs.nj=3"])  # run_dir: one job
    gmm.run(cfg)  # GMM training's realignments and the alignment stage in 3 jobs: the same alignments
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["feats", "mono", "tri"]  # the jobs' ali.JOB files are gone
    for name in ("train", "test"):
        again = np.load(tmp_path / "exp" / "tri" / f"ali_{name}" / "pdf_ids.npy")
        np.testing.assert_array_equal(again, np.load(run_dir / "exp" / "tri" / f"ali_{name}" / "pdf_ids.npy"))


def test_a_gmm_seed_is_recorded_only_when_set() -> None:
    # another draw of the GMM (bench/gmm_seeds.py) must not make every GMM made before the key existed stale
    settings, optional = gmm.training_settings(load_config([]))
    assert "gmm.seed" not in settings.values and optional == {} and settings.values["gmm.tree.max_leaves"] == 400
    assert {k for k in settings.values if k.startswith("gmm.")} == {k for k in sections.config_values(load_config([]), ("gmm",)) if k != "gmm.seed"}
    drawn_settings, drawn = gmm.training_settings(load_config(["gmm.seed=3"]))
    assert drawn == {"gmm.seed": 3} and drawn_settings == settings


DISTILL = ["train.epochs=1", "ensemble.size=2", "distill.temperatures=[1,2]", "distill.students.dense=[1,2]", "distill.students.topk=[2]",
           "distill.students.compact=[2]", "distill.seeds.dense=2", "distill.seeds.compact=2", "distill.seeds.compact_prior=1", "levers.cross_fitted={name:ensemble_xfit,folds:2}", "levers.student_epochs=[2]"]


def ensemble_and_speed_perturbed(run_dir: Path):
    """What the distillation and 3% tests build on, made here when not yet made (each stage skips
    when current, so every test runs alone as well as after the others): the baseline's seeds, a
    2-member ensemble, its soft targets, and train_sp with its features and alignment. Returns the
    distillation config."""
    from asrkd.distill import soft_targets
    from asrkd.kaldi import features, perturb
    from asrkd.nnet import ensemble

    cfg = load_config([f"data_dir={run_dir}/data", f"exp_dir={run_dir}/exp", *TINY, *DISTILL])
    train.run(load_config([f"data_dir={run_dir}/data", f"exp_dir={run_dir}/exp", *TINY, "train.seeds=${distill.seeds.dense}"]))
    ensemble.run(cfg)
    soft_targets.run(cfg)
    perturb.run(cfg)
    sp = load_config([f"data_dir={run_dir}/data", f"exp_dir={run_dir}/exp", *TINY, "features.sets=[${perturb.source}_sp]"])
    features.run(sp)
    gmm.run_align(sp)
    return cfg


def test_ensemble_soft_targets_seeded_students_table1_and_levers(run_dir: Path) -> None:
    from asrkd.distill import student
    from asrkd.distill.soft_targets import current_checksum
    from asrkd.distill.target_store import SoftTargetStore, store_dir
    from asrkd.experiments.distillation import experiment as distillation
    from asrkd.experiments.distillation import levers

    cfg = ensemble_and_speed_perturbed(run_dir)
    store = SoftTargetStore.load(store_dir(sections.layout(cfg), cfg.distill.teacher, 2.0), current_checksum(run_dir / "exp", "train"))
    sharp = SoftTargetStore.load(store_dir(sections.layout(cfg), cfg.distill.teacher, 1.0), current_checksum(run_dir / "exp", "train"))
    np.testing.assert_allclose(np.asarray(store.dense[:100], dtype=np.float32).sum(1), 1.0, atol=2e-2)
    # a higher temperature gives softer targets
    assert np.asarray(store.dense[:100], dtype=np.float32).max(1).mean() < np.asarray(sharp.dense[:100], dtype=np.float32).max(1).mean()
    student.run(cfg)
    for name in ("student_ensemble_T1_dense", "student_ensemble_T2_dense_seed1", "student_ensemble_T2_topk", "student_ensemble_logits"):
        history = json.loads((run_dir / "exp" / "dnn" / name / "history.json").read_text())
        assert len(history) == 1 and history[0]["valid_frame_accuracy"] > 2 * majority_pdf_rate(run_dir / "exp", "train")
    distillation.EXPERIMENT.decode(cfg)
    distillation.EXPERIMENT.publish(cfg)
    report = json.loads((run_dir / "exp" / "report" / "report.json").read_text())
    systems, result = report["systems"], report["distillation"]
    assert {"baseline", "ensemble", "distilled", "distilled_dense_T1", "distilled_dense_T2", "distilled_topk_T2",
            "distilled_logits"} <= set(systems)
    # T is chosen on validation, averaged over the students' seeds
    valid = {t: np.mean([read_history(run_dir / "exp" / "dnn" / f"student_ensemble_T{t}_dense{s}")[-1]["valid_frame_accuracy"]
                         for s in ("", "_seed1")]) for t in (1, 2)}
    assert result["temperature"] == max(valid, key=valid.get) and systems["distilled"]["seeds"] == 2
    assert set(result["temperature_choice"]["valid_frame_accuracy"]) == {"1", "2"}
    test_acc = {name: systems[name]["frame_accuracy"]["test"] for name in ("baseline", "ensemble", "distilled")}
    for name, accuracy in test_acc.items():  # each row counted a second way (a row of seeds: their mean)
        assert accuracy == pytest.approx(frame_accuracy_by_argmax(run_dir / "exp", systems[name]["system"]), abs=1e-9)
    kept = result["gain_kept"]["vs_baseline"]
    assert kept["estimate"] == pytest.approx((test_acc["distilled"] - test_acc["baseline"]) / (test_acc["ensemble"] - test_acc["baseline"]))
    assert kept["ci"] == result["gain_kept_ci"] and kept["ci"][0] <= kept["ci"][1]
    singles = result["table1"]["single_models"]
    assert singles["seeds"] == 4 and len(result["baseline_seeds"]["test_frame_accuracy"]) == 2 and len(result["members"]["test_frame_accuracy"]) == 2
    assert singles["frame_accuracy"]["test"] == pytest.approx(np.mean(result["baseline_seeds"]["test_frame_accuracy"] + result["members"]["test_frame_accuracy"]))
    for name in ("baseline", "ensemble", "distilled"):
        lo, hi = systems[name]["frame_accuracy_ci"]["test"]
        assert lo <= systems[name]["frame_accuracy"]["test"] <= hi and len(systems[name]["wer_ci"]["test"]) == 2
    assert_p_above_zero_agrees(result["differences"]["ensemble − baseline"]["frame_accuracy"])
    forms = {row["form"]: row for row in result["compact_forms"]}
    assert set(forms) == {"topk", "compact", "compact_prior"} and forms["compact"]["seeds"] == 2 and forms["compact_prior"]["seeds"] == 1
    assert forms["compact"]["bytes_per_frame"] <= 0.05 * forms["compact"]["dense_fp32_bytes_per_frame"]  # distill.compact.budget
    assert all(0 <= row["mean_residual"] < 1 and row["temperature"] == 2 for row in forms.values())
    assert systems["ensemble"]["cost"]["parameters"] == 2 * result["table1"]["baseline"]["cost"]["parameters"]  # an ensemble costs its members
    assert "scoring ms / 1000 frames" in (run_dir / "exp" / "report" / "distillation.md").read_text()
    assert set(result["levers"]) == {"train"}  # the reference only: no other lever trained yet
    for name in ("distillation_curves.png", "distillation_temperature.png"):
        assert_drawn(run_dir / "exp" / "report" / name)
    markdown = (run_dir / "exp" / "report" / "distillation.md").read_text()
    assert "| 2x ensemble |" in markdown and "∞ (logit matching)" in markdown and "P(> 0)" in markdown
    assert "| ensemble | 2 x 2x64 | 1 |" in (run_dir / "exp" / "report" / "report.md").read_text()

    levers.EXPERIMENT.train(cfg)
    levers.EXPERIMENT.decode(cfg)
    distillation.EXPERIMENT.publish(cfg)
    result = json.loads((run_dir / "exp" / "report" / "report.json").read_text())["distillation"]
    by_name = result["levers"]
    assert set(by_name) == {"train", "train_sp", "cross-fitted", "epochs 2"}
    assert by_name["train_sp"]["baselines"] == ["baseline_sp"]  # the same-data baseline, levers.seeds replicates
    assert len(by_name["train_sp"]["students"]) == 1 and len(by_name["train"]["students"]) == 2  # the reference keeps stage 3's seeds
    assert not list((run_dir / "exp" / "dnn").glob("student_*_train_sp_seed1"))  # levers.seeds = 1: no replicate trained
    assert by_name["cross-fitted"]["teacher"] == "ensemble_xfit" and by_name["epochs 2"]["baselines"] == ["baseline_e2"]  # its own 2-epoch baseline
    for lever in by_name.values():
        assert len(lever["gain_kept_ci"]) == 2
        assert_p_above_zero_agrees(lever["minus_baseline"])
    assert len(read_history(run_dir / "exp" / "dnn" / "student_ensemble_T{:g}_dense_e2".format(result["temperature"]))) == 2
    assert_drawn(run_dir / "exp" / "report" / "distillation_levers.png")


def test_soft_targets_of_one_teacher_train_a_subset_student(run_dir: Path) -> None:
    from asrkd.distill import soft_targets, student

    cfg = load_config([f"data_dir={run_dir}/data", f"exp_dir={run_dir}/exp", *TINY, "train.epochs=2", "train.data=train_10pct",
                       "distill.teacher=baseline", "distill.temperatures=[2]", "distill.students.dense=[]",
                       "distill.students.topk=[2]", "distill.logit_matching=false"])
    soft_targets.run(cfg)
    assert (run_dir / "exp" / "soft_targets" / "baseline" / "train" / "T2" / "header.json").is_file()
    student.run(cfg)
    history = json.loads((run_dir / "exp" / "dnn" / "student_baseline_T2_topk_train_10pct" / "history.json").read_text())
    assert len(history) == 2


def test_subsets_share_the_validation_speakers_and_early_stopping_keeps_the_best_epoch(run_dir: Path) -> None:
    import torch

    from asrkd.data import DataDir

    full = DataDir.read(run_dir / "data" / "train")
    for fraction in (0.03, 0.1, 0.3):
        subset = DataDir.read(run_dir / "data" / an4_prep.subset_name(fraction))
        assert len(subset.utt2spk) == round(fraction * len(full.utt2spk))
    overrides = [f"data_dir={run_dir}/data", f"exp_dir={run_dir}/exp", *TINY]
    full_train, full_valid = sections.split(load_config(overrides)).utterances()
    cfg = load_config([*overrides, "train.data=train_30pct", "train.name=sub30", "train.epochs=4", "train.keep_epoch_checkpoints=true"])
    sub_train, sub_valid = sections.split(cfg).utterances()
    assert sub_valid == full_valid and set(sub_train) <= set(full_train)
    assert set(sub_train) == set(DataDir.read(run_dir / "data" / "train_30pct").utt_ids) - set(full_valid)
    train.run(cfg)
    out = run_dir / "exp" / "dnn" / "sub30"
    history = json.loads((out / "history.json").read_text())
    train_accuracy = [h["train_frame_accuracy"] for h in history]  # 4 epochs on 30% of the frames: it fits them more each epoch
    assert train_accuracy == sorted(train_accuracy) and train_accuracy[-1] > 3 * majority_pdf_rate(run_dir / "exp", "train")
    best = max(range(len(history)), key=lambda e: history[e]["valid_frame_accuracy"])
    assert torch.load(out / "final.pt", weights_only=False)["epoch"] == 3
    final = torch.load(out / "best.pt", weights_only=False)
    assert final["epoch"] == best
    chosen = torch.load(out / f"epoch-{best}.pt", weights_only=False)["model"]
    assert not (out / "last.pt").exists()  # the resume point goes once training is complete
    assert all(torch.equal(final["model"][k], chosen[k]) for k in chosen)


def test_the_3pct_experiment_decodes_its_tables_rows_and_not_the_curves(tmp_path: Path) -> None:
    # only the first fraction's rows have a WER in the report: decoding the curve's other fractions was time for no number
    from asrkd.experiments.three_percent import experiment as three_percent
    from asrkd.layout import names

    cfg = load_config([f"exp_dir={tmp_path}/exp", f"data_dir={tmp_path}/data", "three_percent.fractions=[0.1,0.3]", "three_percent.seeds=2"])
    by_fraction = three_percent.rows_by_fraction(cfg)
    table, curve = (names([s for row in by_fraction[f].values() for s in row]) for f in (0.1, 0.3))
    decoded = names(three_percent.EXPERIMENT.decoded(cfg))
    assert decoded == ["baseline", *table] and len(table) == 2 * len(by_fraction[0.1]) and not set(curve) & set(decoded)
    assert set(names(three_percent.EXPERIMENT.systems(cfg))) == {"baseline", *table, *curve}  # scored on frames, every one


def test_three_percent_experiment_reports_its_table(run_dir: Path) -> None:
    from asrkd.experiments.three_percent import experiment as three_percent

    ensemble_and_speed_perturbed(run_dir)
    cfg = load_config([f"data_dir={run_dir}/data", f"exp_dir={run_dir}/exp", *TINY, "three_percent.fractions=[0.1,0.3]",
                       "three_percent.epochs=2", "three_percent.seeds=2"])
    three_percent.EXPERIMENT.train(cfg)
    three_percent.EXPERIMENT.decode(cfg)
    three_percent.EXPERIMENT.publish(cfg)
    report = json.loads((run_dir / "exp" / "report" / "report.json").read_text())["three_percent"]
    rows = {"full_hard", "sub_hard", "sub_hard_early_stop", "sub_soft", "sub_hard_sp", "sub_soft_sp"}
    # T=2 soft targets of a 2-member ensemble (its student is the extra row) and train_sp: ensemble_and_speed_perturbed
    assert set(report["rows"]) == rows | {"sub_soft_ensemble"}
    assert report["fraction"] == 0.1 and [c["fraction"] for c in report["curve"]] == [0.1, 0.3]
    for name, row in report["rows"].items():  # each counted a second way: frames by argmax, words by edit distance, over its seeds
        systems = [row["system"]] if isinstance(row["system"], str) else row["system"]
        assert len(systems) == (1 if name == "full_hard" else 2) == row.get("seeds", 1), name  # every replicate named
        assert row["frame_accuracy"]["test"] == pytest.approx(frame_accuracy_by_argmax(run_dir / "exp", systems), abs=1e-9)
        if not any("@" in system for system in systems):  # the early-stopped rows are scored on frames only
            assert row["wer"]["test"] == pytest.approx(sum(wer_from_hypotheses(run_dir, s) for s in systems) / len(systems))
        lo, hi = row["frame_accuracy_ci"]["test"]
        assert lo <= row["frame_accuracy"]["test"] <= hi
    full, hard, soft = (report["rows"][r]["frame_accuracy"]["test"] for r in ("full_hard", "sub_hard", "sub_soft"))
    assert report["gap_closed"] == pytest.approx((soft - hard) / (full - hard))
    assert report["gap_closed_ci"][0] <= report["gap_closed"] <= report["gap_closed_ci"][1]
    assert set(report["curve"][0]["differences"]) == {"sub_soft − sub_hard", "sub_hard_sp − sub_hard", "sub_soft_sp − sub_hard_sp",
                                                     "sub_soft_sp − sub_soft"}
    curve = [s for row in three_percent.rows_by_fraction(cfg)[0.3].values() for s in row]
    assert curve and not any((run_dir / "exp" / "decode" / s.name).exists() for s in curve)  # the curve's points: frames alone
    assert_drawn(run_dir / "exp" / "report" / "three_percent_curves.png")
    assert "| sub_soft |" in (run_dir / "exp" / "report" / "three_percent.md").read_text()


def test_the_tests_find_an4_where_the_recipe_reads_or_fetched_it(tmp_path: Path) -> None:
    from conftest import find_an4

    def corpus(path: Path) -> Path:
        (path / "etc").mkdir(parents=True)
        (path / "etc" / "an4_train.transcription").write_text("")
        return path

    repo = tmp_path / "repo"
    assert find_an4({}, repo) is None
    fetched = corpus(repo / "recipes" / "an4" / "data" / "local" / "downloads" / "an4")  # README's main command put it there
    assert find_an4({}, repo) == fetched
    shared = corpus(tmp_path / "shared" / "corpora" / "an4")
    assert find_an4({}, repo) == shared  # ../shared beside the repository comes first
    assert find_an4({"AN4_DIR": str(tmp_path / "nowhere")}, repo) is None  # an explicit place is the only one looked at


def test_a_report_says_which_cpu_family_made_its_numbers(tmp_path: Path) -> None:
    from asrkd.machine import cpu_description, cpu_family

    assert cpu_family({"avx2", "avx512f", "amx_tile"}) == "AMX" and cpu_family({"avx2", "fma"}) == "AVX2" and cpu_family(set()) == "other"
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU @ 2.0GHz\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\n")
    assert cpu_description(cpuinfo) == "Some CPU @ 2.0GHz (AVX2)"
    epyc = tmp_path / "cpuinfo_epyc"  # another file: descriptions are cached per path
    epyc.write_text("processor\t: 0\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\nflags\t\t: avx2 avx512f\n")
    assert cpu_description(epyc) == "AMD EPYC (AVX-512, family 26 model 2)"  # two generations of one name are two machines


def test_a_report_whose_rows_come_from_two_machines_says_so(tmp_path: Path) -> None:
    from asrkd.machine import cpu_description
    from asrkd.report import machines_note, made_on
    from asrkd.stage import plan, read_record

    cfg = OmegaConf.create({"seed": 0})
    stage = plan("a stage", tmp_path / "out", sections.settings(cfg, ("seed",)))
    stage.commit()
    assert read_record(tmp_path / "out")["made_on"] == cpu_description()  # every output says where it was made
    record = {"fingerprint": "f", "made_on": ["CPU A (AVX2)"]}
    section = {"rows": [{"stage": {"baseline": record}}, {"stage": {"student": record | {"made_on": ["CPU B (AMX)"]}}}],
               "ensemble": {"stage": {"ensemble": {"fingerprint": "g"}}}}
    assert made_on(section) == {"CPU A (AVX2)": ["baseline"], "CPU B (AMX)": ["student"], "not recorded": ["ensemble"]}
    note = machines_note(section)
    assert note.startswith("**Rows made on different machines**") and "CPU B (AMX): student" in note
    assert machines_note({"rows": [{"stage": {"baseline": record}}]}) is None  # one machine: nothing to say
    # an older copy of a record (no made_on) beside a newer one names one machine, not two
    older = {"rows": [{"stage": {"baseline": record}}], "distillation": {"stage": {"baseline": {"fingerprint": "f"}, "student": {"fingerprint": "h"}}}}
    assert made_on(older) == {"CPU A (AVX2)": ["baseline"], "not recorded": ["student"]}
    assert machines_note(older) == "Machine not recorded (models made before their records named the CPU): student."


def test_results_lists_every_scored_system_once_as_kaldi_recipes_do(tmp_path: Path) -> None:
    from asrkd.report import Place, merge_into_report

    entry = {"model": "4x512", "seeds": 1, "frame_accuracy": {"test": 0.55}, "frame_accuracy_ci": {"test": [0.54, 0.56]},
             "wer": {"test": 0.06}, "wer_ci": {"test": [0.05, 0.07]}}
    place = Place(tmp_path / "exp" / "report", tmp_path / "results")
    merge_into_report(place, {"corpus": "an4", "command": "c", "machine": "m", "gmm": {"mono_pdfs": 1, "tri_pdfs": 2, "seconds": 1.0},
                            "systems": {"baseline": entry | {"system": "baseline"}}})
    merge_into_report(place, {"chains": {"rows": {"takd": entry | {"system": ["s", "s_seed1"], "seeds": 2}, "again": entry | {"system": "baseline"}}}})
    listing = (tmp_path / "results" / "RESULTS.md").read_text()
    assert "| baseline | 4x512 | 1 | 6.00% [5.00, 7.00] | 55.00% [54.00, 56.00] |" in listing
    assert "## chains" in listing and "| s (+1 seeds) | 4x512 | 2 |" in listing and listing.count("| baseline |") == 1
    assert listing.endswith("- systems: m\n- chains: not recorded\n")  # each section's machine and code, as its report names them


def test_an_lm_of_ones_own_brings_its_words_into_a_decoding_lang_and_lowers_the_wer(run_dir: Path, tmp_path: Path) -> None:
    import shutil

    from asrkd.data import read_table
    from asrkd.kaldi import graph
    from asrkd.kaldi.lang import Lang

    shutil.copytree(run_dir / "data", tmp_path / "data", symlinks=True)
    shutil.copytree(run_dir / "exp", tmp_path / "exp", symlinks=True)
    before = json.loads((tmp_path / "exp" / "decode" / "baseline" / "wer.json").read_text())["test"]["wer"]
    extra = tmp_path / "lm_text.txt"  # the test set's own sentences (an in-domain LM), and TOO: a homophone of TWO the lexicon lacks
    extra.write_text("".join(f"{t}\n" for t in read_table(tmp_path / "data" / "test" / "text").values()) + "TOO\n")
    cfg = load_config([f"data_dir={tmp_path}/data", f"exp_dir={tmp_path}/exp", *TINY, f"graph.lm_text=[{extra}]", "redo=true"])
    graph.run(cfg)
    trained, decoding = Lang.load(tmp_path / "data" / "lang"), Lang.load(tmp_path / "exp" / "graph" / "lang")
    assert "TOO" not in trained.words and "TOO" in decoding.words and "TOO" in graph.language_model(cfg).vocabulary()
    assert {p: i for p, i in decoding.phones.items() if not p.startswith("#")} == {p: i for p, i in trained.phones.items() if not p.startswith("#")}
    assert len(decoding.disambig_ids) >= len(trained.disambig_ids)  # TOO and TWO sound alike: a #n tells them apart
    decode.run(OmegaConf.merge(cfg, {"decode": {"systems": ["baseline"]}}))  # the graph changed: the decode is redone
    assert json.loads((tmp_path / "exp" / "decode" / "baseline" / "wer.json").read_text())["test"]["wer"] < before
    arpa = tmp_path / "user.arpa"  # the same LM as a user's ARPA file: decoded with as it is
    shutil.copyfile(graph.language_model(cfg).arpa, arpa)
    user = load_config([f"data_dir={tmp_path}/data", f"exp_dir={tmp_path}/exp", *TINY, f"graph.lm_arpa={arpa}", "redo=true"])
    graph.run(user)
    assert (tmp_path / "exp" / "graph" / "lm.arpa").read_bytes() == arpa.read_bytes() and "TOO" in graph.language_model(user).vocabulary()


def test_a_record_and_a_report_name_the_commit_of_the_code_that_made_them(tmp_path: Path) -> None:
    """The commit HEAD names, '+changes' when a tracked file of the code differs from it: after an
    edit to a tracked file of a scratch clone, its code_commit says so, and a record made there too."""
    import shutil
    import subprocess
    import sys

    from conftest import REPO

    if subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--no-local", str(REPO), str(clone)], check=True)
    head = subprocess.run(["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    probe = ("from asrkd.stage import Settings, code_commit, plan; import json, sys; "
             "s = plan('probe', sys.argv[1], Settings({'seed': 0})); s.commit(); "
             "print(code_commit(), json.load(open(sys.argv[1] + '/stage.json'))['made_with'])")

    def named(out: Path) -> list[str]:
        result = subprocess.run([sys.executable, "-c", probe, str(out)], cwd=clone, capture_output=True, text=True,
                                env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(clone), "HOME": str(tmp_path)})
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout.split()

    assert named(tmp_path / "a") == [head[:12]] * 2
    shutil.copy2(clone / "conf" / "config.yaml", tmp_path / "config.yaml")
    (clone / "conf" / "config.yaml").write_text((tmp_path / "config.yaml").read_text() + "\n# an edit\n")
    assert named(tmp_path / "b") == [f"{head[:12]}+changes"] * 2


def test_stats_unit_speaker_reaches_the_bootstrap_of_every_set(run_dir: Path) -> None:
    """With stats.unit=speaker every replicate gives all utterances of a speaker one weight (whole
    speakers drawn), for frames and words alike; with utterance the weights differ within a speaker."""
    from asrkd import evaluate
    from asrkd.data import DataDir

    from conftest import tiny_config

    def spread_within_speakers(unit: str) -> float:
        evaluation = evaluate.Evaluation(tiny_config(run_dir, f"stats.unit={unit}", "stats.replicates=200"))
        utt2spk = DataDir.read(run_dir / "data" / "test").utt2spk
        spread = 0.0
        for boot in (evaluation.frames_by_set["test"], evaluation.words_by_set["test"]):
            speakers = np.array([utt2spk[u] for u in boot.utt_ids])
            assert len(set(speakers)) >= 2 and len(speakers) > len(set(speakers))
            for speaker in set(speakers):
                weights = boot.weights[:, speakers == speaker]
                spread = max(spread, float((weights.max(axis=1) - weights.min(axis=1)).max()))
        return spread

    assert spread_within_speakers("speaker") == 0.0
    assert spread_within_speakers("utterance") > 0.0


def test_the_gmm_trains_without_the_validation_speakers(run_dir: Path) -> None:
    """The LM weight is chosen on the validation speakers for every system, so the GMM must not train
    on them: its flat start took train's utterances with features less the validation speakers'
    (data.split_by_speaker, a second route)."""
    from asrkd.data import DataDir, split_by_speaker

    from conftest import tiny_config

    cfg = tiny_config(run_dir)
    data = DataDir.read(run_dir / "data" / "train")
    with_features = set(FeatureStore.load(run_dir / "exp" / "feats" / "mfcc" / "train").utt_ids)
    valid = set(split_by_speaker(data, float(cfg.train.valid_fraction), int(cfg.seed))[1]) & with_features
    assert valid and json.loads((run_dir / "exp" / "mono" / "dropped.json").read_text())["total"] == len(with_features - valid)
