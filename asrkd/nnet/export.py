"""Stage: a trained system for a user's own decoder (``asrkd export``; ``exp/export/<system>``).

``model.pt2`` is a ``torch.export`` program (``torch.export.load(path).module()``; AOTInductor
compiles it for C++): (frames, window, fbank dims) spliced fbank windows in, any number of
frames, (frames, pdfs) scaled log-likelihoods out, log p(pdf | x) - log p(pdf): what our
decoder feeds Kaldi's, priors included (an ensemble exports its average). ``model.onnx`` is
the same program through torch's ONNX exporter (it needs ``onnx`` and ``onnxscript``:
``pip install asrkd[export]``), for onnxruntime. Beside them:
``priors.vec`` (the floored pdf priors, Kaldi text vector), ``tid2pdf.txt`` (transition-id ->
pdf-id of the GMM's transition model, which the decoding graph's input labels are), and
``export.json`` (context, feature settings, files). Windows are built as ``SplicedFrames``
does: ``left_context`` frames before, ``right_context`` after, edges repeated.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from asrkd import sections
from asrkd.files import atomic_write, write_bytes, write_json, write_text
from asrkd.kaldi.decode import log_priors
from asrkd.kaldi.gmm_model import GmmModel
from asrkd.nnet.checkpoints import load_system, system_dirs
from asrkd.stage import plan

log = logging.getLogger(__name__)


class ScaledLogLikelihoods(nn.Module):
    """A DNN system with its priors: spliced windows -> log-posteriors minus log-priors."""

    def __init__(self, model: nn.Module, log_priors: np.ndarray):
        super().__init__()
        self.model = model
        self.register_buffer("log_priors", torch.as_tensor(log_priors, dtype=torch.float32))

    def forward(self, spliced: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.model(spliced).float(), dim=-1) - self.log_priors


def run(cfg) -> None:
    """Stage: export ``export.system`` (a DNN or an ensemble under exp/dnn)."""
    exp, layout = Path(cfg.exp_dir), sections.layout(cfg)
    system = str(cfg.export.system)
    out_dir = layout.export(system)
    inputs = {f"model {d.name}": d for d in system_dirs(exp, system)} | {"priors": layout.alignment("train"), "transition model": layout.gmm}
    stage = plan(f"export {system}", out_dir, sections.settings(cfg, ("decode.prior_floor", "features")), inputs, {"system": system})
    if stage.up_to_date:
        return
    model = load_system(exp, system, torch.device("cpu")).eval()
    priors = log_priors(np.load(layout.pdf_counts), cfg.decode.prior_floor)
    scorer = ScaledLogLikelihoods(model, priors).eval()
    config = model.config
    window = config["left_context"] + 1 + config["right_context"]
    example = torch.zeros(4, window, config["feat_dim"])
    dynamic = {"spliced": {0: torch.export.Dim("frames")}}
    with torch.no_grad():
        program = torch.export.export(scorer, (example,), dynamic_shapes=dynamic)
    buffer = io.BytesIO()  # through memory: a full disk is then write_bytes' one-line error, not torch's
    torch.export.save(program, buffer)
    write_bytes(out_dir / "model.pt2", buffer.getbuffer())
    onnx = None
    try:
        exported = torch.onnx.export(scorer, (example,), input_names=["spliced_fbank"], output_names=["loglikes"],
                                     dynamic_shapes=dynamic, dynamo=True, verbose=False)
        with atomic_write(out_dir / "model.onnx") as tmp:
            exported.save(str(tmp))
        onnx = "model.onnx"
    except ImportError as err:  # the exporter needs the onnx and onnxscript packages
        log.warning("export %s: no ONNX file (%s); model.pt2 only (pip install asrkd[export] adds it)", system, str(err).splitlines()[0])
    write_text(out_dir / "priors.vec", " [ " + " ".join(f"{p:.8g}" for p in np.exp(priors)) + " ]\n")
    tid_to_pdf = GmmModel.load(layout.gmm).tid_to_pdf()
    write_text(out_dir / "tid2pdf.txt", "".join(f"{tid} {int(tid_to_pdf[tid])}\n" for tid in range(1, len(tid_to_pdf))))
    write_json(out_dir / "export.json", {
        "system": system, "models": len(system_dirs(exp, system)), "input": "spliced fbank (frames, window, feat_dim)",
        "output": "log p(pdf | x) - log p(pdf), (frames, num_pdfs)", "left_context": config["left_context"],
        "right_context": config["right_context"], "feat_dim": config["feat_dim"], "num_pdfs": config["num_pdfs"],
        "fbank": {k: cfg.features[k] for k in ("sample_rate", "frame_length_ms", "frame_shift_ms", "dither", "num_mel_bins")},
        "files": {"torch_export": "model.pt2", "onnx": onnx, "priors": "priors.vec", "pdf_map": "tid2pdf.txt"}})
    stage.commit(onnx=onnx is not None)
    log.info("export %s -> %s", system, out_dir)
