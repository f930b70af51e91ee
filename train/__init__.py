"""Training scripts: `python -m train` (loop.py, built by build.py), `python -m train.evaluate`, `python -m train.export`;
the run config schema (config.py), metrics logging (metrics_log.py) and ROUGE (rouge.py)."""
