from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from asrkd.distill.target_store import FRAMES_PER_HOUR, SoftTargetMismatch, SoftTargetStore, TeacherLogits, compact_k, source_checksum, stores_dense, top_k


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
    indices = torch.tensor([4, 0, 29])
    np.testing.assert_allclose(store.rows("dense").batch(indices).numpy(), probs[indices], atol=1e-3)
    renormalized = store.rows("topk").batch(indices).numpy()
    assert ((renormalized > 0).sum(1) == 3).all() and np.allclose(renormalized.sum(1), 1.0, atol=1e-3)
    assert store.topk_ids.dtype == np.int16  # 12 pdfs: ids in half of int32's bytes
    other = source_checksum("abc", np.arange(1, 31))  # the same features, another alignment
    with pytest.raises(SoftTargetMismatch, match="rerun the soft-targets stage"):
        SoftTargetStore.load(tmp_path, other)


def test_teacher_logits_round_trip_and_mismatch(tmp_path: Path) -> None:
    logits = np.random.default_rng(1).normal(size=(20, 7)).astype(np.float32)
    checksum = source_checksum("abc", np.arange(20))
    TeacherLogits.from_logits(logits, checksum).save(tmp_path)
    loaded = TeacherLogits.load(tmp_path, checksum)
    assert loaded.header["num_frames"] == 20 and loaded.header["num_pdfs"] == 7
    np.testing.assert_allclose(loaded.rows().batch(torch.tensor([3, 19])).numpy(), logits[[3, 19]], atol=1e-2)
    with pytest.raises(SoftTargetMismatch, match="rerun the soft-targets stage"):
        TeacherLogits.load(tmp_path, source_checksum("abd", np.arange(20)))


def test_compact_form_keeps_the_true_mass_and_spreads_the_rest() -> None:
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.full(40, 0.3), size=50).astype(np.float32)
    store = SoftTargetStore.from_probs(probs, 2.0, 10, "x")
    # budget 5% of a 40-pdf fp32 row = 8 bytes: one pdf (4 bytes) + the residual (2); a loose residual target takes fewer
    assert store.rows("compact", compact={"budget": 0.05, "max_residual": 0.0}).k == 1
    assert store.rows("compact", compact={"budget": 1.0, "max_residual": 0.0}).k == 10  # never more than the store keeps
    rows = store.rows("compact", compact={"budget": 0.5, "max_residual": 0.0})
    assert rows.k == 10 and rows.bytes_per_frame() == 42
    batch = rows.batch(torch.arange(50)).numpy()
    np.testing.assert_allclose(batch.sum(1), 1.0, atol=2e-3)
    top = np.sort(probs, 1)[:, ::-1]
    np.testing.assert_allclose(np.sort(batch, 1)[:, ::-1][:, :10], top[:, :10], atol=2e-3)  # not renormalized
    outside = (1 - top[:, :10].sum(1)) / 30
    np.testing.assert_allclose(np.sort(batch, 1)[:, :30], np.repeat(outside[:, None], 30, 1), atol=1e-3)  # spread evenly
    # k per T from the residual: the smallest k whose mean residual is within the target
    sorted_probs = np.array([[0.6, 0.3, 0.1], [0.8, 0.15, 0.05]])
    assert compact_k(sorted_probs, np.zeros(2), 100, 1.0, 0.15) == 2 and compact_k(sorted_probs, np.zeros(2), 100, 1.0, 0.31) == 1


def test_a_store_too_large_for_the_dense_form_keeps_the_top_k_form_alone(tmp_path: Path) -> None:
    # 14,000 pdfs (the paper's tree): the dense form is 28 kB a frame, ~10 GB an hour; above distill.dense_limit_gb it is not stored
    auto = OmegaConf.create({"store_dense": "auto", "dense_limit_gb": 8})
    assert stores_dense(auto, 100 * FRAMES_PER_HOUR // 1000, 14_000) and not stores_dense(auto, FRAMES_PER_HOUR, 14_000)
    assert stores_dense(OmegaConf.create({"store_dense": True, "dense_limit_gb": 0}), FRAMES_PER_HOUR, 14_000)
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.full(40, 0.3), size=50).astype(np.float32)
    SoftTargetStore.from_probs(probs, 2.0, 10, "x", dense=False).save(tmp_path / "topk")
    SoftTargetStore.from_probs(probs, 2.0, 10, "x").save(tmp_path / "all")
    alone, full = SoftTargetStore.load(tmp_path / "topk", "x"), SoftTargetStore.load(tmp_path / "all", "x")
    assert not (tmp_path / "topk" / "dense.npy").exists() and alone.header["dense"] is False and "dense" not in full.header
    compact = {"budget": 0.5, "max_residual": 0.0}
    for form in ("topk", "compact"):  # the same rows as from a store that has every form
        np.testing.assert_array_equal(alone.rows(form, compact=compact).batch(torch.arange(50)).numpy(),
                                      full.rows(form, compact=compact).batch(torch.arange(50)).numpy())
    with pytest.raises(ValueError, match="holds the top-k form alone.*distill.store_dense.*distill.on_the_fly=true"):
        alone.rows("dense")
    # the report's label diagnostics read either store: the same argmax; the mass low by at most the residual
    frames, labels = np.arange(50), rng.integers(0, 40, 50)
    labels[:25] = probs[:25].argmax(1)
    (agree_full, mass_full), (agree_alone, mass_alone) = (store.label_agreement(frames, labels) for store in (full, alone))
    assert agree_full == agree_alone >= 25
    assert mass_full - float(np.asarray(alone.residual, dtype=np.float32).sum()) - 1e-2 <= mass_alone <= mass_full + 1e-2


def test_the_soft_targets_are_the_members_average_softmax_at_t() -> None:
    """Hinton et al.'s ensemble targets: the arithmetic mean of the members' softmax(z/T), written out
    by hand in numpy; it differs from the softmax of the members' mean logits (a geometric mean)."""
    from asrkd.nnet.model import average_softmax

    rng = np.random.default_rng(0)
    member_logits = rng.normal(size=(3, 4, 6)) * 4  # members, frames, pdfs
    T = 2.0
    exp = np.exp(member_logits / T - (member_logits / T).max(-1, keepdims=True))
    by_hand = (exp / exp.sum(-1, keepdims=True)).mean(0)
    got = average_softmax(torch.from_numpy(member_logits), T).numpy()
    np.testing.assert_allclose(got, by_hand, rtol=1e-6)
    mean_logits = member_logits.mean(0) / T
    geometric = np.exp(mean_logits - mean_logits.max(-1, keepdims=True))
    assert np.abs(geometric / geometric.sum(-1, keepdims=True) - by_hand).max() > 0.01  # the two rules differ here
