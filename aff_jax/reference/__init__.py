"""Reference implementations in other frameworks, for parity checks and the compare tool.

``torch_port``: the PyTorch port's architecture (needs the ``torch`` extra).
"""
