"""Self-distillation with shallow exits (BYOT): the multi-exit network, its loss, and the stages on the tiny run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from asrkd.experiments.self_distillation.loss import self_distillation_loss
from asrkd.experiments.self_distillation.model import ExitOutputs, MultiExitDNN
from asrkd.nnet.checkpoints import load_model, save_model

from conftest import tiny_config


@pytest.mark.parametrize("head_width", [None, 3])
def test_every_exit_is_a_plain_model_that_scores_as_the_exit_did(head_width: int | None, tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = MultiExitDNN(feat_dim=4, num_pdfs=5, left_context=1, right_context=1, num_hidden_layers=3, hidden_dim=8, exits=[1, 2],
                       head_width=head_width)
    x = torch.randn(6, 3, 4)
    outputs = net.train()(x)
    assert isinstance(outputs, ExitOutputs) and len(outputs.logits) == len(outputs.features) == 3
    assert [f.shape[1] for f in outputs.features] == [8, 8, 8]  # every head's features as wide as the deepest: the hints compare them
    for logits, k in zip(outputs.logits, (1, 2, 3)):
        exit_model = net.exit_model(k)
        widths = [layer.out_features for layer in exit_model.layers if isinstance(layer, torch.nn.Linear)][:-1]
        if k == 3:
            assert widths == [8, 8, 8]
        else:
            assert widths == [8] * k + ([8] if head_width is None else [3, 3, 8])  # BYOT's bottleneck: reduce, then expand back
        assert exit_model.config["num_hidden_layers"] == len(widths) and "exits" not in exit_model.config
        torch.testing.assert_close(exit_model(x), logits)
        save_model(tmp_path / "final.pt", exit_model, epoch=-1)
        torch.testing.assert_close(load_model(tmp_path / "final.pt", torch.device("cpu"))(x), logits)  # its shape is in its config
    torch.testing.assert_close(net.eval()(x), outputs.logits[-1])  # in eval, the deepest exit alone


def test_the_hints_target_is_the_deepest_features_without_dropout() -> None:
    torch.manual_seed(0)
    net = MultiExitDNN(feat_dim=4, num_pdfs=5, left_context=1, right_context=1, num_hidden_layers=3, hidden_dim=64, dropout=0.5, exits=[1])
    last_relu = [layer for layer in net.layers if isinstance(layer, torch.nn.ReLU)][-1]
    seen = []
    last_relu.register_forward_hook(lambda module, inputs, output: seen.append(output))
    outputs = net.train()(torch.randn(6, 3, 4))
    torch.testing.assert_close(outputs.features[-1], seen[-1])  # the last hidden layer's ReLU output, before its dropout
    dropped = net.layers[list(net.layers).index(last_relu) + 1](seen[-1])
    assert not torch.equal(dropped, seen[-1])  # dropout still acts on the way to the output


def test_the_deepest_exit_teaches_without_being_taught() -> None:
    torch.manual_seed(0)
    logits = [torch.randn(4, 5, requires_grad=True) for _ in range(3)]
    features = [torch.randn(4, 8, requires_grad=True) for _ in range(3)]
    hard = torch.tensor([0, 1, 2, -1])
    plain = self_distillation_loss(logits, features, hard, 3.0, 0.0, 0.0)
    expected = sum(torch.nn.functional.cross_entropy(z, hard, ignore_index=-1) for z in logits)
    torch.testing.assert_close(plain, expected)
    self_distillation_loss(logits, features, hard, 3.0, 0.3, 0.1).backward()
    deepest = logits[-1].detach().clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(deepest, hard, ignore_index=-1).backward()
    torch.testing.assert_close(logits[-1].grad, deepest.grad)  # the kd and hint terms leave the teacher alone
    assert features[-1].grad is None and features[0].grad is not None and logits[0].grad is not None



def test_the_byot_loss_is_its_formula_with_the_t_squared_kd_term() -> None:
    """The value for kd_weight w, T and hint weight h, written out by hand (numpy, float64): the deepest
    exit's CE + for the shallow exit (1 - w) CE + w T^2 sum_k q_k (-log p_k(T)) + h mean squared feature
    distance. A kd term without its T^2 (or at T = 1 inside) changes the value by far more than the tolerance."""
    import numpy as np

    torch.manual_seed(1)
    logits = [torch.randn(5, 4) * 3 for _ in range(2)]
    features = [torch.randn(5, 6) for _ in range(2)]
    hard = torch.tensor([0, 3, 1, 2, 1])
    T, w, h = 4.0, 0.3, 0.2

    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    shallow, deep = (z.double().numpy() for z in logits)
    rows = np.arange(5)
    ce = lambda z: -log_softmax(z)[rows, hard.numpy()].mean()  # noqa: E731
    q = np.exp(log_softmax(deep / T))
    kd = -(q * log_softmax(shallow / T)).sum(axis=1).mean()
    hint = ((features[0].double().numpy() - features[1].double().numpy()) ** 2).mean()
    expected = ce(deep) + (1 - w) * ce(shallow) + w * T**2 * kd + h * hint
    assert abs(kd * (T**2 - 1) * w) > 0.05  # the T^2 factor matters at this T: a loss without it misses by this much
    value = self_distillation_loss(logits, features, hard, T, w, h).item()
    assert value == pytest.approx(expected, rel=1e-5)

def test_self_distillation_stages_on_the_tiny_run(run_dir: Path, tmp_path: Path) -> None:
    from asrkd.experiments.self_distillation import experiment as self_distillation
    from asrkd.nnet import train

    shutil.copytree(run_dir / "data", tmp_path / "data", symlinks=True)
    shutil.copytree(run_dir / "exp", tmp_path / "exp", symlinks=True)
    cfg = tiny_config(tmp_path, "model.num_hidden_layers=3", "train.name=deep3", "self_distillation.exits=[1]", "train.epochs=1")
    train.run(cfg)  # the full-depth plain model (the main recipe's baseline in a real run)
    self_distillation.EXPERIMENT.train(cfg)
    self_distillation.EXPERIMENT.decode(cfg)
    self_distillation.EXPERIMENT.publish(cfg)
    report = json.loads((tmp_path / "exp" / "report" / "report.json").read_text())["self_distillation"]
    assert [(row["exit_layer"], row["hidden_layers"], row["plain"]["system"]) for row in report["rows"]] == [(1, 2, "plain_2x64"), (3, 3, "deep3")]
    exit_row = report["rows"][0]
    assert exit_row["exit"]["cost"]["parameters"] == exit_row["plain"]["cost"]["parameters"]  # the same shape
    assert "test" in exit_row["exit"]["wer"] and "ci" in exit_row["minus_plain"]
    assert exit_row["deep_supervision"]["system"] == "byot_deep_supervision_exit1" and "ci" in exit_row["minus_deep_supervision"]
    control = json.loads((tmp_path / "exp" / "dnn" / "byot_deep_supervision" / "stage.json").read_text())["config"]
    assert control["kd_weight"] == control["hint_weight"] == 0.0 and control["exits"] == [1]
    assert (tmp_path / "exp" / "report" / "self_distillation.png").is_file()
    assert "| 1 | 2 |" in (tmp_path / "exp" / "report" / "self_distillation.md").read_text()


def test_bottleneck_heads_and_the_plain_models_of_their_shape(run_dir: Path, tmp_path: Path) -> None:
    from asrkd.experiments.self_distillation import experiment as self_distillation

    shutil.copytree(run_dir / "data", tmp_path / "data", symlinks=True)
    shutil.copytree(run_dir / "exp", tmp_path / "exp", symlinks=True)
    cfg = tiny_config(tmp_path, "model.num_hidden_layers=3", "train.name=deep3", "self_distillation.exits=[1]", "train.epochs=1",
                      "self_distillation.head_width=16", "self_distillation.deep_supervision_control=false")
    self_distillation.train(cfg)
    exp = tmp_path / "exp" / "dnn"
    exit_model = load_model(exp / "byot_exit1" / "final.pt", torch.device("cpu"))
    plain = load_model(exp / "plain_1x64_bottleneck16" / "final.pt", torch.device("cpu"))
    assert exit_model.config["hidden_dims"] == plain.config["hidden_dims"] == [64, 16, 16, 64]
    assert [p.shape for p in exit_model.parameters()] == [p.shape for p in plain.parameters()]  # the same shape, trained alone
    assert json.loads((exp / "byot" / "stage.json").read_text())["config"]["head_width"] == 16


def test_a_network_with_exits_draws_its_weights_as_a_model_built_alone(tmp_path: Path) -> None:
    """The training loop builds a network of its own arguments (exits, heads) from the seed alone: no
    other model's weights drawn before it, so a run reproduces one made by building it directly."""
    from types import SimpleNamespace

    from asrkd.nnet.train import new_models

    cfg = tiny_config(tmp_path, "model.num_hidden_layers=3")
    data = SimpleNamespace(pdf_ids=torch.zeros(1, dtype=torch.long), normalize_inputs=False, frames=SimpleNamespace(store=SimpleNamespace(dim=4)),
                           num_pdfs=5)
    net = new_models(cfg.model, cfg.seed, data, None, [7], {"exits": [1], "head_width": 3})
    torch.manual_seed(7)
    alone = MultiExitDNN(4, 5, cfg.model.left_context, cfg.model.right_context, 3, cfg.model.hidden_dim, cfg.model.dropout, [1], head_width=3)
    assert net.config == alone.config
    for ours, theirs in zip(net.state_dict().values(), alone.state_dict().values()):
        assert torch.equal(ours, theirs)
