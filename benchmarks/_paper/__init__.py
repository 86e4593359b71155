"""Shared pieces of the paper benchmarks (``paper_iwrm.py``, ``multitask.py``).

* :mod:`._data` — offline data sets: scikit-learn's digits, MNIST-1D (Greydanus 2020), breast cancer,
  and the multi-task sets MultiDigits (MultiMNIST-style, Sabour et al. 2017) and a breast-cancer task set;
* :mod:`._models` — the small CNNs / MLPs / the demo's ViT, and the shared-encoder multi-task model;
* :mod:`._training` — one training run through ``JDTrainer`` (or a scalarizer loop) with per-epoch records;
* :mod:`._selection` — the learning-rate grid and its selection by area under the training-loss curve
  (Quinton & Rey, arXiv:2406.16232, Section 5);
* :mod:`._stats` — means, standard errors, Δm% (Maninis et al. 2019; LibMTL, Lin & Zhang 2023);
* :mod:`._report` — Markdown tables and the loss-curve figure;
* :mod:`._parallel` — running the independent runs on a few worker processes.
"""
