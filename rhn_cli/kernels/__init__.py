"""rhn's kernels: the hand-written, hand-differentiated and native (C++) code that makes
the models fast, below rhn_cli.models (which reads as the equations) and above nothing of
rhn_cli but rhn_cli.atomic. Importing the package imports nothing (torch stays lazy).

* :mod:`~rhn_cli.kernels.rhn_recurrence`: an RHN layer's recurrence with a hand-written
  backward (RHNLayer's fast path), its Python loop and the driver of the C++ one.
* :mod:`~rhn_cli.kernels.lstm_recurrence`: the Zoneout LSTM's and Gal-masked LSTM layers'
  recurrence with a hand-written backward (their fast path; the models' autograd loops
  stay the reference).
* :mod:`~rhn_cli.kernels.gru_recurrence`: the tutorial GRU layer's, likewise.
* :mod:`~rhn_cli.kernels.output_layer`: the RHN output layer's hand-written backward and
  the tied embedding's gradient hand-over.
* :mod:`~rhn_cli.kernels.projection`: the RHN layer's (and the Gal LSTM layers') input
  projection through oneDNN, with a hand-written backward.
* :mod:`~rhn_cli.kernels.native`: builds and loads ``csrc/`` (one C++ extension: the
  recurrence's forward and backward, the fused softmax cross-entropy, the fused
  penalised SGD step, transposes), each build announced with its reason (``rhn kernels
  build``, or a run before its clock starts), and says where it applies
  (:func:`kernels_for`).
* :mod:`~rhn_cli.kernels.onednn`: oneDNN's products on prepacked weights.
* :mod:`~rhn_cli.kernels.weight_gradient`: the weight-gradient products, through MKL or
  oneDNN as decided by :mod:`~rhn_cli.kernels.library_choice` (once per machine, on disk).
* :mod:`~rhn_cli.kernels.buffers`: the memory pools and torch's private autograd and
  storage calls, with their fallbacks.
"""
