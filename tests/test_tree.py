from pathlib import Path

import kaldi_hmm_gmm as khg
import numpy as np
import pytest

from asrkd.kaldi import tree as T


def test_objf_matches_kaldi_gauss_clusterable() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(37, 3)) * [1.0, 0.05, 2.0]  # one dimension below the variance floor
    ours = T.gaussian_objf(np.float64(len(x)), x.sum(0), (x * x).sum(0), var_floor=0.01)
    kaldi = khg.GaussClusterable(x.sum(0), (x * x).sum(0), 0.01, float(len(x)))
    assert ours == pytest.approx(kaldi.objf(), rel=1e-7)  # Kaldi returns float32


def test_split_gain_by_hand() -> None:
    # 1-d: left context 1 -> frames {0, 2}, left context 2 -> frames {10, 12}
    # parent: mean 6, var 26; children: var 1 each (4 frames in all)
    # objf(n, var) = -n/2 (log(2 pi) + log var + 1); gain = 4/2 * log(26)
    events = np.array([[1, 5, 0, 0], [2, 5, 0, 0]])
    stats = T.TreeStats(events, np.array([2.0, 2.0]), np.array([[2.0], [22.0]]), np.array([[4.0], [244.0]]))
    member = T.question_membership([np.array([1]), np.array([7])], 8)
    gain, key, question = T.best_split(stats, np.arange(2), member, (0, 1, 2), min_count=1.0, var_floor=1e-6)
    assert (key, question) == (0, 0)
    assert gain == pytest.approx(2.0 * np.log(26.0))
    assert T.best_split(stats, np.arange(2), member, (0, 1, 2), min_count=3.0, var_floor=1e-6) is None


def test_frame_events_use_neighbouring_phones_and_utterance_edges() -> None:
    # phones 4 4 4 | 7 7 | 4 4 ; HMM states restart at 0 for each instance, also for 4 after 4
    phones = np.array([4, 4, 4, 4, 4, 7, 7])
    states = np.array([0, 1, 2, 0, 2, 0, 2])
    events = T.frame_events(phones, states, states)
    assert events[:, :3].tolist() == [[0, 4, 4]] * 3 + [[4, 4, 7]] * 2 + [[4, 7, 0]] * 2


def test_tree_stats_in_buckets_and_blocks_are_a_single_pass_bit_for_bit(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    events = rng.integers(0, 5, size=(5000, 4))
    events[:1500] = 0  # one event larger than a bucket and a block
    frames = rng.normal(size=(5100, 7)).astype(np.float32)  # the store; utterance u's frames are rows starts[u]...
    lengths = np.diff(np.r_[0, np.sort(rng.choice(np.arange(1, 5000), 99, replace=False)), 5000])
    starts = np.cumsum(np.r_[0, lengths[:-1] + 1])  # a row left out between utterances (an unaligned one)
    rows = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths)])
    unique, inverse = np.unique(events, axis=0, return_inverse=True)  # the single pass: one reduction per event
    x = frames[rows].astype(np.float64)[np.argsort(inverse.reshape(-1), kind="stable")]
    cuts = np.r_[0, np.cumsum(np.bincount(inverse.reshape(-1)))[:-1]]
    whole_sum, whole_sumsq = np.add.reduceat(x, cuts, axis=0), np.add.reduceat(x * x, cuts, axis=0)
    utterances = lambda: zip(np.split(events, np.cumsum(lengths)[:-1]), starts)  # noqa: E731
    for bucket_frames, block_rows in ((10**9, 10**9), (1, 1), (13, 13), (1000, 64), (2000, 10**9)):
        stats = T.accumulate_tree_stats(utterances(), 5000, frames, (5, 5, 5, 5), tmp_path, bucket_frames, block_rows)
        assert np.array_equal(stats.events, unique) and stats.count.tolist() == np.bincount(inverse.reshape(-1)).tolist()
        assert np.array_equal(stats.sum, whole_sum) and np.array_equal(stats.sumsq, whole_sumsq), (bucket_frames, block_rows)
    assert list(tmp_path.iterdir()) == []  # its working files are gone
    first = np.flatnonzero((events == events[0]).all(axis=1))  # event (0, 0, 0, 0): its frames' float64 sum
    assert stats.sum[0].tolist() == np.add.reduceat(frames[rows[first]].astype(np.float64), [0], axis=0)[0].tolist()


def test_event_keys_sort_as_the_events_and_decode_back() -> None:
    events = np.random.default_rng(2).integers(0, 7, size=(500, 4))
    keys = T.event_keys(events, (7, 7, 7, 7))
    assert np.array_equal(T.key_events(keys, (7, 7, 7, 7)), events)
    assert np.array_equal(T.key_events(np.unique(keys), (7, 7, 7, 7)), np.unique(events, axis=0))


def synthetic_stats() -> T.TreeStats:
    """Phone 3's middle state sounds different after phone 1 than after phone 2."""
    rng = np.random.default_rng(1)
    events, count, total, sumsq = [], [], [], []
    for left in (1, 2):
        for pdf_class in (0, 1, 2):
            shift = 4.0 if (left == 1 and pdf_class == 1) else 0.0
            x = rng.normal(shift + pdf_class, 1.0, size=(200, 2))
            events.append([left, 3, 0, pdf_class])
            count.append(len(x)), total.append(x.sum(0)), sumsq.append((x * x).sum(0))
    return T.TreeStats(np.array(events), np.array(count, float), np.array(total), np.array(sumsq))


def test_build_tree_splits_where_the_context_matters_and_kaldi_reads_it() -> None:
    stats = synthetic_stats()
    phone_sets = [[1], [2], [3]]
    questions = [np.array([1]), np.array([2]), np.array([1, 2])]
    root, leaves = T.build_tree(stats, phone_sets, {1: 3, 2: 3, 3: 3}, questions, max_leaves=10, min_count=50, min_gain=50.0, var_floor=0.01)
    assert len(leaves) == 10  # 9 (phone, pdf-class) roots + the one split that pays
    tree = T.load_context_dependency(T.to_kaldi_binary(root))
    assert (tree.context_width, tree.central_position, tree.num_pdfs) == (3, 1, 10)
    # the split is on phone 3's pdf-class 1, by left context
    _, after_1 = tree.compute(phone_seq=[1, 3, 0], pdf_class=1)
    _, after_2 = tree.compute(phone_seq=[2, 3, 0], pdf_class=1)
    _, after_1_state_0 = tree.compute(phone_seq=[1, 3, 0], pdf_class=0)
    _, after_2_state_0 = tree.compute(phone_seq=[2, 3, 0], pdf_class=0)
    assert after_1 != after_2 and after_1_state_0 == after_2_state_0
    assert sorted(tree.compute(phone_seq=[0, p, 0], pdf_class=c)[1] for p in (1, 2) for c in range(3)) == list(range(6))
    # Kaldi's own writer gives back the bytes we wrote
    assert bytes(np.array(tree.__getstate__()[0], dtype=np.int8).tobytes()) == T.to_kaldi_binary(root)


def test_binary_writer_matches_kaldi_on_a_kaldi_made_tree() -> None:
    topo = khg.HmmTopology()
    topo.read("<Topology> <TopologyEntry> <ForPhones> 1 2 3 </ForPhones> <State> 0 <PdfClass> 0 <Transition> 0 0.5 "
              "<Transition> 1 0.5 </State> <State> 1 </State> </TopologyEntry> </Topology>")
    kaldi_tree = khg.monophone_context_dependency(phones=topo.phones, phone2num_pdf_classes=topo.get_phone_to_num_pdf_classes())
    # Kaldi's monophone tree: a table on the phone (key 0) of tables on the pdf-class
    ours = T.Table(0, [None] + [T.Table(T.PDF_CLASS_KEY, [T.Leaf(np.zeros(0), pdf_id=i)]) for i in range(3)])
    kaldi_bytes = np.array(kaldi_tree.__getstate__()[0], dtype=np.int8).tobytes()
    assert T.to_kaldi_binary(ours, context_width=1, central_position=0) == kaldi_bytes
