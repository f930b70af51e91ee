"""Training scripts: `python -m train` (train.py), `python -m train.evaluate`, `python -m train.export`."""
