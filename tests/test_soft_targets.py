from pathlib import Path

import numpy as np
import pytest

from asrkd.soft_targets import SoftTargetMismatch, SoftTargetStore, TeacherLogits, source_checksum, top_k


def test_top_k_renormalizes_and_accounts_for_the_rest() -> None:
    probs = np.array([[0.5, 0.3, 0.1, 0.1], [0.05, 0.05, 0.1, 0.8]])
    ids, kept, residual = top_k(probs, 2)
    assert [sorted(row) for row in ids.tolist()] == [[0, 1], [2, 3]]
    np.testing.assert_allclose(kept.sum(1), 1.0)
    np.testing.assert_allclose(residual, [0.2, 0.1], atol=1e-6)


def test_store_round_trip_and_mismatch(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(12), size=30).astype(np.float32)
    checksum = source_checksum("abc", np.arange(30))
    SoftTargetStore.from_probs(probs, 2.0, 3, checksum).save(tmp_path)
    store = SoftTargetStore.load(tmp_path, checksum)
    assert store.header == {"temperature": 2.0, "k": 3, "num_pdfs": 12, "num_frames": 30, "source_checksum": checksum}
    indices = np.array([4, 0, 29])
    np.testing.assert_allclose(store.batch(indices, "dense").numpy(), probs[indices], atol=1e-3)
    compact = store.batch(indices, "topk").numpy()
    assert ((compact > 0).sum(1) == 3).all() and np.allclose(compact.sum(1), 1.0, atol=1e-3)
    other = source_checksum("abc", np.arange(1, 31))  # the same features, another alignment
    with pytest.raises(SoftTargetMismatch, match="rerun the soft-targets stage"):
        SoftTargetStore.load(tmp_path, other)


def test_teacher_logits_round_trip_and_mismatch(tmp_path: Path) -> None:
    logits = np.random.default_rng(1).normal(size=(20, 7)).astype(np.float32)
    checksum = source_checksum("abc", np.arange(20))
    TeacherLogits.from_logits(logits, checksum).save(tmp_path)
    loaded = TeacherLogits.load(tmp_path, checksum)
    assert loaded.header["num_frames"] == 20 and loaded.header["num_pdfs"] == 7
    np.testing.assert_allclose(loaded.batch(np.array([3, 19])).numpy(), logits[[3, 19]], atol=1e-2)
    with pytest.raises(SoftTargetMismatch, match="rerun the soft-targets stage"):
        TeacherLogits.load(tmp_path, source_checksum("abd", np.arange(20)))
