from pathlib import Path

import numpy as np
import pytest
import torch

from asrkd.nnet.model import EnsembleDNN, HybridDNN, SplicedFrames, average_softmax, average_zero_mean_logits
from asrkd.schema import ConfigError
from asrkd.stores import FeatureStore


def test_splicing_repeats_edge_frames_and_never_crosses_utterances() -> None:
    # frame value = its global index, so a window shows which frames it took
    store = FeatureStore.from_arrays({"a": np.arange(4.0)[:, None], "b": np.arange(4.0, 10.0)[:, None]})
    spliced = SplicedFrames(store, left=2, right=1)
    windows = spliced.context(torch.tensor([0, 3, 4, 9]))[..., 0]
    assert windows.tolist() == [
        [0, 0, 0, 1],  # first frame of "a": left context repeats it
        [1, 2, 3, 3],  # last frame of "a": right context repeats it, never reaches "b"
        [4, 4, 4, 5],  # first frame of "b": never reaches back into "a"
        [7, 8, 9, 9],
    ]
    assert spliced.frame_indices(["b"]).tolist() == list(range(4, 10))


def test_a_memory_mapped_store_gives_the_windows_and_rows_of_a_resident_one(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    FeatureStore.from_arrays({f"u{i}": rng.normal(size=(int(n), 3)) for i, n in enumerate(rng.integers(1, 30, 20))}, "float16").save(tmp_path)
    mapped = SplicedFrames(FeatureStore.load(tmp_path), left=4, right=2)
    resident = SplicedFrames(FeatureStore.load(tmp_path, mmap=False), left=4, right=2)
    assert isinstance(mapped.frames, np.memmap) and isinstance(resident.frames, torch.Tensor)
    indices = torch.from_numpy(rng.permutation(mapped.store.num_frames))
    assert torch.equal(mapped.context(indices), resident.context(indices))
    assert np.array_equal(mapped.rows(indices.numpy()[:50]), resident.rows(indices.numpy()[:50]))


def test_stores_combined_end_to_end_read_each_row_from_its_own_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    items = {f"u{i:02d}": rng.normal(size=(int(n), 3)) for i, n in enumerate(rng.integers(1, 30, 20))}
    names = sorted(items)
    for part, chosen in (("train", names[:12]), ("transfer", names[12:])):
        FeatureStore.from_arrays({u: items[u] for u in chosen}, "float16").save(tmp_path / part)
    combined = FeatureStore.concat([FeatureStore.load(tmp_path / part) for part in ("train", "transfer")])
    whole = FeatureStore.from_arrays(items, "float16")  # the same utterances, in order, in memory
    assert combined.utt_ids == whole.utt_ids and np.array_equal(combined.offsets, whole.offsets)
    assert all(isinstance(part, np.memmap) for part in combined.frames.parts)  # nothing copied
    assert combined.checksum() == whole.checksum() and np.array_equal(combined["u13"], whole["u13"])
    mapped, resident = SplicedFrames(combined, left=4, right=2), SplicedFrames(whole, left=4, right=2)
    indices = torch.from_numpy(rng.permutation(whole.num_frames))
    assert torch.equal(mapped.context(indices), resident.context(indices))
    assert np.array_equal(np.asarray(combined.frames), whole.frames)  # copied whole for a GPU
    with pytest.raises(IndexError):
        combined.frames[np.array([whole.num_frames])]


def test_paper_sized_input_and_output() -> None:
    model = HybridDNN(feat_dim=40, num_pdfs=300, left_context=20, right_context=5, num_hidden_layers=2, hidden_dim=64)
    assert model.layers[0].in_features == 26 * 40
    assert model(torch.zeros(7, 26, 40)).shape == (7, 300)


def test_a_second_ensemble_draws_other_members_on_the_same_split() -> None:
    from asrkd import sections
    from asrkd.cli import load_config
    from asrkd.nnet.ensemble import member_seeds

    first, second = load_config([]), load_config(["ensemble.name=ensemble_b", "ensemble.first_seed=1001"])
    assert member_seeds(first.ensemble, first.seed) == list(range(1, 11))  # as every committed ensemble was made: their fingerprints stay
    assert member_seeds(second.ensemble, second.seed) == list(range(1001, 1011)) and sections.split(second) == sections.split(first)
    with pytest.raises(ConfigError, match="ensemble.first_seed=-1 is outside"):
        load_config(["ensemble.first_seed=-1"])


def test_ensemble_predicts_the_members_average_softmax() -> None:
    torch.manual_seed(0)
    members = [HybridDNN(feat_dim=3, num_pdfs=5, left_context=1, right_context=1, num_hidden_layers=1, hidden_dim=8) for _ in range(3)]
    ensemble = EnsembleDNN(members)
    x = torch.randn(4, 3, 3)
    average = torch.stack([torch.softmax(m(x), -1) for m in members]).mean(0)
    torch.testing.assert_close(torch.softmax(ensemble(x), -1), average)  # its output works as logits
    torch.testing.assert_close(ensemble(x).exp().sum(-1), torch.ones(4))
    logits = ensemble.member_logits(x)
    torch.testing.assert_close(average_softmax(logits, 1.0), average)
    # as T grows, T * (average softmax(z/T) - 1/N) * N tends to the average zero-mean logits
    high = 1000.0
    torch.testing.assert_close(high * 5 * (average_softmax(logits, high) - 0.2), average_zero_mean_logits(logits), atol=1e-2, rtol=1e-2)


def test_he_init_keeps_the_signal_through_the_papers_depth() -> None:
    """model=paper's init: the last hidden layer's activations keep the input's scale; PyTorch's
    default init (the small models') shrinks them about sixfold in variance per ReLU layer."""
    from asrkd.cli import load_config
    from asrkd.nnet.model import model_from_config

    from omegaconf import OmegaConf

    paper = OmegaConf.to_container(load_config(["model=paper"]).model)
    assert paper["init"] == "he"
    x = torch.randn(512, 26, 40)
    scale = {}
    for init in ("default", "he"):
        torch.manual_seed(0)
        net = HybridDNN.from_config(40, 100, OmegaConf.create(paper | {"init": init, "hidden_dim": 256}))
        with torch.no_grad():
            scale[init] = float(net.layers[:-1](x.flatten(1)).pow(2).mean())
    assert 0.3 < scale["he"] < 3.0  # the input's mean square is 1
    assert scale["default"] < 0.01
    torch.manual_seed(0)
    he = HybridDNN.from_config(40, 100, OmegaConf.create(paper | {"hidden_dim": 256}))
    assert he.config["init"] == "he" and "init" not in HybridDNN(40, 100, 2, 2, 2, 32).config  # default models' configs stay as they were
    rebuilt = model_from_config(he.config)
    rebuilt.load_state_dict(he.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(x[:4]), he(x[:4]))
    with pytest.raises(ValueError, match="model.init must be default or he"):
        HybridDNN(40, 100, 2, 2, 2, 32, init="xavier")


def test_a_block_shuffle_reads_the_store_a_block_at_a_time_and_the_default_is_a_permutation() -> None:
    from asrkd.nnet.training_set import epoch_order

    train_idx = np.random.default_rng(0).choice(10_000, size=2_500, replace=False)
    assert np.array_equal(epoch_order(train_idx, np.random.default_rng([0, 3]), None), np.random.default_rng([0, 3]).permutation(train_idx))
    order = epoch_order(train_idx, np.random.default_rng([0, 3]), 300)
    assert sorted(order.tolist()) == sorted(train_idx.tolist())
    blocks = np.sort(train_idx)[: 2_400].reshape(8, 300)  # the 9th block holds the last 100 frames
    runs = [order[i : i + 300] for i in range(0, 2_500, 300)]
    starts = [int(np.flatnonzero(np.isin(order, block))[0]) for block in blocks]
    assert all(np.array_equal(np.sort(order[s : s + 300]), block) for s, block in zip(starts, blocks))  # each block read whole
    assert starts != sorted(starts) and not all(np.array_equal(run, np.sort(run)) for run in runs)  # blocks and frames both shuffled


def test_adam_is_fused_only_where_it_pays_so_fp32_cpu_results_reproduce_bit_for_bit() -> None:
    """Fused Adam is the same update in another order: after a few steps its weights differ from the
    per-tensor loop's in the last bits. The trainer fuses under bf16 autocast (8x2560 on an AMX CPU:
    a quarter faster) and on a GPU; fp32 on a CPU keeps the loop the committed results were made with."""
    from types import SimpleNamespace

    from asrkd.nnet.train import fused_adam

    cpu = torch.device("cpu")
    assert not fused_adam(SimpleNamespace(bf16_autocast=False), cpu) and fused_adam(SimpleNamespace(bf16_autocast=True), cpu)
    assert fused_adam(SimpleNamespace(bf16_autocast=False), torch.device("cuda"))

    def trained(fused: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, fused=fused, foreach=None if fused else False)
        generator = torch.Generator().manual_seed(1)
        for _ in range(20):
            x, y = torch.randn(64, 16, generator=generator), torch.randint(0, 5, (64,), generator=generator)
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
        return [p.detach() for p in net.parameters()]

    assert not all(torch.equal(a, b) for a, b in zip(trained(False), trained(True)))  # why the rule matters
