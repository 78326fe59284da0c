"""asrkd: hybrid DNN-HMM acoustic models and their distillation, with Kaldi's conventions."""

__version__ = "0.1.0"
