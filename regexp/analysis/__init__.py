"""Sweep analysis: from run folders to ``results.csv``, an aggregated curve, a plot and TensorBoard.

- :mod:`.collect` finds the runs below any sweep folder (an in-process ``task=sweep`` or a Hydra
  multirun) and turns each into a point (its overrides) and its ``metrics.json``;
- :mod:`.curves` averages the runs over seeds into curves against the swept value and finds the
  interpolation threshold (parameters = training samples);
- :mod:`.plots` draws the curves; :mod:`.tb` writes them as sweep-level TensorBoard scalars;
- :mod:`.report` does all of it for one sweep folder (used by the ``sweep`` task and
  ``scripts/plot_sweep.py``).
"""
