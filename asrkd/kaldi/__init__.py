"""The Kaldi side: lang dir (``lang``), features (``features``, ``perturb``), the GMM-HMM and its
alignments (``tree``, ``gmm``), the decoding graph (``graph``) and WFST decoding (``decode``).
Estimation, graph compilation, alignment and decoding are Kaldi's own code (k2-fsa's wheels)."""
