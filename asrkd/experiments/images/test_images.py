"""The paper's image experiment (§3) on a synthetic IDX set: reading, the big net's regularization, the stages."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from asrkd.experiments.images import nets
from asrkd.experiments.images import report as image_report
from asrkd.experiments.images.data import IDX_FILES, jitter, read_idx, run_prepare
from asrkd.experiments.images.model import ConvImageNet
from asrkd.nnet.checkpoints import load_model, save_model
from asrkd.nnet.model import HybridDNN, model_from_config
from asrkd.nnet.train import TrainStep, hidden_weights

from conftest import tiny_config


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def synthetic_set(corpus: Path, train: int = 400, test: int = 200) -> None:
    """Ten classes of 28x28 images: class c lights a bar at row 2c + 4, with noise."""
    rng = np.random.default_rng(0)
    corpus.mkdir(parents=True)
    for split, count in (("train", train), ("test", test)):
        labels = np.arange(count) % 10
        images = rng.integers(0, 60, size=(count, 28, 28))
        for i, label in enumerate(labels):
            images[i, 2 * label + 4, 6:22] = 255
        prefix = "t10k" if split == "test" else "train"
        write_idx(corpus / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(corpus / f"{prefix}-labels-idx1-ubyte.gz", labels)


def test_idx_files_read_back_and_a_cut_file_is_refused(tmp_path: Path) -> None:
    array = np.arange(2 * 28 * 28).reshape(2, 28, 28) % 256
    write_idx(tmp_path / "a.gz", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), array)
    with gzip.open(tmp_path / "a.gz", "rb") as f:
        data = f.read()
    (tmp_path / "cut").write_bytes(data[:-10])
    with pytest.raises(ValueError, match="cut short"):
        read_idx(tmp_path / "cut")


def test_jitter_moves_images_whole_by_at_most_the_shift() -> None:
    torch.manual_seed(0)
    images = torch.zeros(64, 1, 28 * 28)
    images.view(64, 28, 28)[:, 10:18, 10:18] = torch.rand(64, 8, 8)  # content well inside the border
    moved = jitter(2, 0.0)(images)
    torch.testing.assert_close(moved.sum(-1), images.sum(-1))  # nothing cut off, nothing added
    rows = moved.view(64, 28, 28).sum(2).nonzero()[:, 1]
    assert rows.min() >= 8 and rows.max() <= 19 and not torch.equal(moved, images)


def test_max_norm_caps_every_hidden_unit(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "train.max_norm=0.5", "train.lr=0.5")
    net = HybridDNN(feat_dim=4, num_pdfs=3, left_context=0, right_context=0, num_hidden_layers=2, hidden_dim=6)

    class Frames:
        def context(self, batch):
            return torch.randn(len(batch), 1, 4)

    class Data:
        frames = Frames()
        augment = None

    step = TrainStep(cfg.train, net, Data(), None, torch.randint(0, 3, (32,)))
    step(torch.arange(32))
    for weight, dim in hidden_weights(net):
        assert weight.norm(dim=dim).max() <= 0.5 + 1e-5
    assert net.layers[-1].weight.norm(dim=1).max() > 0.5  # the output layer is free


def test_image_recipe_stages_on_a_synthetic_set(tmp_path: Path) -> None:
    synthetic_set(tmp_path / "corpus")
    cfg = tiny_config(tmp_path, f"images.corpus_dir={tmp_path}/corpus", f"results_dir={tmp_path}/results", "images.valid_images=100",
                      "images.lr=0.01",  # six steps an epoch: at 0.001 a net would end where it began, and be refused as having learned nothing
                      "images.big.width=32", "images.big.epochs=2", "images.small.width=16", "images.small.epochs=2",
                      "images.big_variants.conv.channels=[4,8]", "images.big_variants.conv.width=16",
                      "images.function_matching.epochs=2", "images.seeds=2",
                      "images.widths=[8,16]", "images.temperatures=[2,20]", "images.replicates=200",
                      "images.bias_shifts.stop=2.0", "images.bias_shifts.step=0.5")
    run_prepare(cfg)
    nets.run_train_nets(cfg)
    image_report.run_report(cfg)  # stage 2 not run yet: the nets trained so far
    progress = json.loads((tmp_path / "results" / "report.json").read_text())
    assert progress["complete"] is False and set(progress["rows"]) == {"small_alone", "big", "big_jitter1", "big_light", "big_conv",
                                                                       "teacher_seeds", "teacher_ensemble"}
    ensemble = progress["rows"]["teacher_ensemble"]  # the held-out evidence for images.teacher=ensemble
    assert ensemble["nets"] == [progress["teacher"], f"{progress['teacher']}_seed1"] and 0 <= ensemble["held_out_errors"][0] <= 100
    assert f"seeds' average softmax (images.teacher=ensemble) makes {ensemble['held_out_errors'][0]} held-out errors" in (
        tmp_path / "results" / "report.md").read_text()
    assert progress["teacher"] in {"big", "big_jitter1", "big_light", "big_conv"} and "student_w16_T20_seed1" in progress["missing"]
    assert " | conv 4-8 (5x5, 2x2 pooling, dropout 0.25) + 1x16, dropout 0.5 (inputs 0), jitter ±2 px | 1 |" in (
        tmp_path / "results" / "report.md").read_text()  # the conv candidate: no max-norm
    assert progress["rows"]["small_alone"]["seeds"] == 2 and "ci" in progress["rows"]["big_light"]["fewer_than_small_alone"]
    assert f"| {progress['teacher']} (the teacher) |" in (tmp_path / "results" / "report.md").read_text()
    nets.run_train_students(cfg)
    image_report.run_report(cfg)
    report = json.loads((tmp_path / "results" / "report.json").read_text())
    rows = report["rows"]
    assert {"big", "small_alone", "small_distilled", "left_out", "left_out_corrected", "kept_only", "kept_only_corrected",
            "small_jittered", "function_matching"} <= set(rows)
    assert all(row["test_images"] == 200 and row["errors_ci"][0] <= row["errors"] <= row["errors_ci"][1] for row in rows.values())
    assert report["seeds"]["small_distilled"] == ["student_w16_T20", "student_w16_T20_seed1"]
    assert rows["big"]["seeds"] == 2 and rows["big"]["errors"] == sum(rows["big"]["errors_per_seed"]) / 2
    assert "ci" in rows["small_distilled"]["gap_closed"] and "ci" in rows["function_matching"]["fewer_than_control"]
    seed1 = json.loads((tmp_path / "exp" / "dnn" / "student_w16_T20_seed1" / "stage.json").read_text())
    teacher = report["teacher"]
    compared = {net["name"]: net["held_out_errors"] for net in report["big_nets"]}
    assert list(compared) == ["big", "big_jitter1", "big_light", "big_conv"] and compared[teacher] == min(compared.values())
    assert report["seeds"]["big"] == [teacher, f"{teacher}_seed1"]
    assert report["big"]["jitter"] == {"big": 2, "big_jitter1": 1, "big_light": 0, "big_conv": 2}[teacher]
    assert report["teacher_model"] == ("conv" if teacher == "big_conv" else "mlp")
    assert seed1["config"]["teacher"] == f"{teacher}_seed1"  # seed r is taught by big net r, of the teacher's settings
    matching = json.loads((tmp_path / "exp" / "dnn" / "student_w16_T20_fm_jitter2" / "stage.json").read_text())
    assert matching["config"]["jitter"] == 2 and matching["config"]["train.patience"] == 20
    histories = report["histories"]
    assert {"big", "big_jitter1", "big_light", "big_conv", f"{teacher}_seed1", "small_alone_seed1", "student_w16_T20_fm_jitter2",
            "small_jitter2"} <= set(histories)
    assert all(len(h["held_out_error_percent"]) == len(h["train_error_percent"]) == h["epochs"] == 2 for h in histories.values())
    assert (tmp_path / "results" / "curves.png").is_file()
    assert rows["left_out"]["errors_on_class"] >= rows["left_out_corrected"]["errors_on_class"] or rows["left_out_corrected"]["bias_shift"] == 0
    assert rows["kept_only"]["errors"] >= 100  # 8 of 10 classes never seen: most of those images are wrong
    assert [row["width"] for row in report["temperature_width"]] == [8, 16]
    md = (tmp_path / "results" / "report.md").read_text()
    assert "| big net, regularized (2 seeds; best epoch" in md and (tmp_path / "results" / "temperature_width.png").is_file()
    assert "| big net | dropout (inputs) | jitter | held-out errors |" in md and f"| {teacher} (the teacher) |" in md
    average = rows["big_average"]  # one net teaches (images.teacher=net): the seeds' average beside it, with its held-out errors
    assert average["nets"] == report["seeds"]["big"] and len(average["seeds_held_out_errors"]) == 2 and 0 <= average["held_out_errors"] <= 200
    assert "| the big nets' average probabilities, not the teacher (2 seeds; held-out errors" in md
    left_out = json.loads((tmp_path / "exp" / "dnn" / "student_w16_T20_no3" / "stage.json").read_text())
    assert left_out["config"]["transfer"] == "no3"
    ensemble_cfg = OmegaConf.merge(cfg, {"images": {"teacher": "ensemble"}})  # the big seeds' average teaches every student
    nets.run_train_students(ensemble_cfg)
    image_report.run_report(ensemble_cfg)
    report = json.loads((tmp_path / "results" / "report.json").read_text())
    assert report["seeds"]["small_distilled"] == ["student_w16_T20_ensemble", "student_w16_T20_ensemble_seed1"]  # beside the others
    seed1 = json.loads((tmp_path / "exp" / "dnn" / "student_w16_T20_ensemble_seed1" / "stage.json").read_text())
    assert seed1["config"]["teacher"] == [teacher, f"{teacher}_seed1"] and len(seed1["inputs"]) > len(left_out["inputs"])
    assert report["rows"]["big_ensemble"]["nets"] == [teacher, f"{teacher}_seed1"] and "ci" in report["rows"]["big_ensemble"]["fewer_than_small_alone"]
    assert "| the big nets' ensemble, the teacher (the 2 seeds' average probabilities) |" in (tmp_path / "results" / "report.md").read_text()
    made = (tmp_path / "exp" / "images" / "labels.npy").stat().st_mtime_ns
    run_prepare(cfg)  # current: nothing remade
    assert (tmp_path / "exp" / "images" / "labels.npy").stat().st_mtime_ns == made
    cut = bytes([0, 0, 0x08, 1]) + (200).to_bytes(4, "big") + bytes(150)  # 200 labels announced, 150 there
    (tmp_path / "corpus" / f"{IDX_FILES['test_labels']}.gz").write_bytes(gzip.compress(cut))
    with pytest.raises(ValueError, match="cut short"):
        run_prepare(tiny_config(tmp_path, f"images.corpus_dir={tmp_path}/corpus", "redo=true"))
    assert (tmp_path / "exp" / "images" / "labels.npy").stat().st_mtime_ns == made  # the last good images are kept


def test_a_big_net_variant_may_change_only_the_big_nets_settings(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "+images.big_variants.typo={jiter: 1}")
    with pytest.raises(ValueError, match=r"images.big_variants.typo sets jiter: not keys of images.big"):
        nets.big_nets(cfg.images)


def test_the_conv_net_trains_in_the_one_loop_and_loads_as_any_model(tmp_path: Path) -> None:
    """The image experiment's conv big net: logits of the right shape from a batch of 784-pixel frames,
    a checkpoint that loads back (its kind registered) to the same outputs, and an unknown kind refused."""
    torch.manual_seed(0)
    net = ConvImageNet(feat_dim=784, num_pdfs=10, left_context=0, right_context=0, num_hidden_layers=1, hidden_dim=16, dropout=0.5,
                       channels=[4, 8], kernel=5, conv_dropout=0.25).eval()
    x = torch.rand(3, 1, 784)
    assert net(x).shape == (3, 10) and sum(isinstance(m, torch.nn.Conv2d) for m in net.layers) == 2
    save_model(tmp_path / "best.pt", net, epoch=0)
    torch.testing.assert_close(load_model(tmp_path / "best.pt", torch.device("cpu")).eval()(x), net(x))
    with pytest.raises(ValueError, match="model kind 'capsule' is not known here"):
        model_from_config({**net.config, "kind": "capsule"})
