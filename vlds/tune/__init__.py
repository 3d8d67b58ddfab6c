"""The hyperparameter search (`vlds tune`; Ray Tune + successive halving): search.py (the
command), space.py (the space, its defaults per preset, `Setup`), trial.py (one trial: a vlds
training run), scheduler.py (successive halving, strict ASHA) and results.py (the CSV, heatmap,
budget and best_config.json).

Needs the `tune` extra (`pip install "vlds[tune]"`). Nothing is imported here: `space` and
`results` import without Ray; `search` checks for it when it starts.
"""
