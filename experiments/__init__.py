"""Experiment files (`python -m research.run experiment=NAME` loads NAME.yaml from here); a package so
`pip install .` ships them."""
