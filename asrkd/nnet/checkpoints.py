"""Trained models on disk (every stage that trains or loads a DNN): checkpoints written through
memory (a full disk is one clear error naming the file), ``last.pt`` read back only when it is of
this very run, a system's model directories (one DNN, or an ensemble's members) and its model
loaded by name (``<name>[@best]``), the per-epoch history."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import torch

from asrkd.files import write_bytes
from asrkd.layout import Layout
from asrkd.nnet.model import EnsembleDNN, HybridDNN, model_from_config
from asrkd.stage import input_fingerprint

log = logging.getLogger(__name__)


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save through memory: torch's zip writer turns a full disk into "unexpected pos";
    written by write_bytes it is the one-line error naming the file."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(path, buffer.getbuffer())


def save_model(path: Path, model: HybridDNN, epoch: int) -> None:
    save_checkpoint(path, {"model": model.state_dict(), "config": model.config, "epoch": epoch})


def read_checkpoint(path: Path, device: torch.device, fingerprint: str) -> dict | None:
    """``last.pt`` when it is readable and of this very run; else None (with a warning when unusable)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as err:  # a file cut short by a kill or a full disk: torch's zip reader fails
        log.warning("%s is unreadable (%s): training starts from epoch 0", path, str(err).splitlines()[0])
        return None
    if state.get("fingerprint") != fingerprint:
        log.warning("%s belongs to another configuration: training starts from epoch 0", path)
        return None
    return state


def read_history(model_dir: Path) -> list[dict]:
    """The per-epoch records train_model wrote (loss, frame accuracies, seconds)."""
    return json.loads((Path(model_dir) / "history.json").read_text())


def model_path(exp_dir: Path, system: str) -> Path:
    """``exp/dnn/<name>/final.pt`` (the last epoch), or ``best.pt`` for ``<name>@best`` (early stopping)."""
    name, _, which = system.partition("@")
    return Layout(Path(exp_dir)).model(name) / f"{which or 'final'}.pt"


def load_model(path: Path, device: torch.device) -> HybridDNN:
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such model; train it first") from None
    except Exception as err:
        raise ValueError(f"{path} is truncated or corrupt ({str(err).splitlines()[0]}); remake it: rerun the stage that trained it "
                         "with redo=true (recipes: --redo)") from err
    model = model_from_config(state["config"]).to(device)
    model.load_state_dict(state["model"])
    return model


def system_dirs(exp_dir: Path, system: str) -> list[Path]:
    """The model directories behind a system: one DNN, or an ensemble's members."""
    name = system.partition("@")[0]
    model_dir = Layout(Path(exp_dir)).model(name)
    members = sorted(model_dir.glob("member-*"), key=lambda d: int(d.name.split("-")[1]))
    return members or [model_dir]


def load_system(exp_dir: Path, system: str, device: torch.device) -> HybridDNN | EnsembleDNN:
    """The model of a DNN system: ``<name>[@best]`` under exp/dnn, or an ensemble's directory
    (``exp/dnn/<name>/member-<i>``), whose members' average softmax is its prediction."""
    name, at, which = system.partition("@")
    dirs = system_dirs(exp_dir, system)
    for directory in dirs:
        input_fingerprint(directory)  # complete, and not made from inputs that were remade since
    if dirs != [Layout(Path(exp_dir)).model(name)]:
        return EnsembleDNN([load_model(model_path(exp_dir, f"{name}/{d.name}{at}{which}"), device) for d in dirs])
    return load_model(model_path(exp_dir, system), device)
