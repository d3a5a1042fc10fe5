"""Training of the bundled shapes model (kept apart from what loads and runs it): `python -m dragondiff.train.shapes`."""
