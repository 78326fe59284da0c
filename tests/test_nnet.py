import numpy as np
import torch

from asrkd.features import FeatureStore
from asrkd.nnet import HybridDNN, SplicedFrames


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


def test_paper_sized_input_and_output() -> None:
    model = HybridDNN(feat_dim=40, num_pdfs=300, left_context=20, right_context=5, num_hidden_layers=2, hidden_dim=64)
    assert model.layers[0].in_features == 26 * 40
    assert model(torch.zeros(7, 26, 40)).shape == (7, 300)
