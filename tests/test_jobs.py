"""Parallel jobs (Kaldi's nj): any number of jobs, on any backend, makes what one job makes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from asrkd.kaldi import features
from asrkd.jobs import split
from asrkd.stores import FeatureStore

from conftest import tiny_config
from .test_reliability import clone


def test_split_is_contiguous_near_equal_and_never_empty() -> None:
    assert split(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split([1, 2], 5) == [[1], [2]]


def test_a_job_knows_the_model_kinds_its_command_registered() -> None:
    # a worker is a fresh process: it imports what the command had imported (the experiment that registered
    # the kind), else a checkpoint of that kind loads in the command and fails in its jobs
    import asrkd.experiments.self_distillation.test_self_distillation  # noqa: F401  (as the whole suite has it imported)
    from asrkd.experiments.self_distillation.model import MultiExitDNN
    from asrkd.jobs import Jobs, imported_modules, map_jobs
    from asrkd.nnet.model import model_from_config

    assert "asrkd.experiments.self_distillation.model" in imported_modules()
    assert not [m for m in imported_modules() if m.rpartition(".")[2].startswith("test_")]  # a job cannot import a test's fixtures

    plain = {"feat_dim": 4, "num_pdfs": 5, "left_context": 1, "right_context": 1, "num_hidden_layers": 3, "hidden_dim": 8}
    models = map_jobs(Jobs(nj=2), model_from_config, [plain | {"exits": [1]}, plain | {"exits": [2]}], "kinds")
    assert [type(m) for m in models] == [MultiExitDNN, MultiExitDNN] and [m.config["exits"] for m in models] == [[1], [2]]
    with pytest.raises(ValueError, match="a model config with exitz is no HybridDNN's: its model kind is registered by the experiment"):
        model_from_config(plain | {"exitz": [1]})  # a kind no experiment registered here: named, not a TypeError deep in a job


@pytest.mark.parametrize("backend", ["local", "submitit"])
def test_features_in_parallel_jobs_equal_one_job(run_dir: Path, tmp_path: Path, backend: str) -> None:
    root = clone(run_dir, tmp_path, exp=False)
    made = {}
    for nj in (1, 3):
        exp = root / f"exp_nj{nj}"
        features.run(tiny_config(root, f"exp_dir={exp}", "features.sets=[test]", f"jobs.nj={nj}", f"jobs.backend={backend}",
                                 "jobs.submitit.cluster=local"))
        made[nj] = {kind: exp / "feats" / kind / "test" for kind in ("fbank", "mfcc")}
    for kind in ("fbank", "mfcc"):
        one, three = (FeatureStore.load(made[nj][kind]) for nj in (1, 3))
        assert one.utt_ids == three.utt_ids and np.array_equal(np.asarray(one.frames), np.asarray(three.frames))
        assert (made[1][kind] / "dropped.json").read_text() == (made[3][kind] / "dropped.json").read_text()
    if backend == "submitit":
        assert list((root / "exp_nj3" / "jobs").rglob("*_log.out"))  # submitit's per-job logs


def test_decoding_in_parallel_jobs_equals_one_job(run_dir: Path, tmp_path: Path) -> None:
    from asrkd.nnet import decode

    root = clone(run_dir, tmp_path)
    out = {}
    for nj in (1, 2):
        cfg = tiny_config(root, f"jobs.nj={nj}", "decode.systems=[gmm,baseline]", "decode.write_loglikes_ark=true", "redo=true")
        decode.run(cfg)
        out[nj] = {system: {name: (root / "exp" / "decode" / system / name).read_bytes()
                            for name in ("hyp_valid.txt", "hyp_test.txt", "loglikes_test.ark", "dropped_test.json")}
                   for system in ("gmm", "baseline")}
        out[nj]["wer"] = {system: json.loads((root / "exp" / "decode" / system / "wer.json").read_text()) for system in ("gmm", "baseline")}
        for result in out[nj]["wer"].values():
            result.pop("real_time_factor")
    assert out[1] == out[2]


def test_soft_targets_in_parallel_jobs_equal_one_job(run_dir: Path, tmp_path: Path) -> None:
    from asrkd.distill import soft_targets

    root = clone(run_dir, tmp_path)
    arrays = {}
    for nj in (1, 2):
        cfg = tiny_config(root, f"jobs.nj={nj}", "distill.teacher=baseline", "distill.temperatures=[2]", "eval.batch_size=512",
                          f"exp_dir={root}/exp", "redo=true")
        soft_targets.run(cfg)
        directory = root / "exp" / "soft_targets" / "baseline" / "train"
        arrays[nj] = {path.relative_to(directory): np.load(path) for path in sorted(directory.rglob("*.npy"))}
        for path in directory.rglob("stage.json"):
            path.unlink()  # the next nj remakes them (the fingerprint holds no jobs.*)
    assert len(arrays[1]) == 5 and arrays[1].keys() == arrays[2].keys()  # dense, top-k ids/probs, residual; logits
    assert all(np.array_equal(arrays[1][name], arrays[2][name]) for name in arrays[1])
