"""Trainer integrations, each behind an optional extra and imported only when used:

* :mod:`sdsurgery.integrations.lightning`: ``StochasticDepthCallback`` for PyTorch Lightning
  (``pip install 'sdsurgery[lightning]'``);
* :mod:`sdsurgery.integrations.transformers`: ``StochasticDepthCallback`` for the Hugging Face ``Trainer``
  (``pip install 'sdsurgery[hf]'``).
"""
