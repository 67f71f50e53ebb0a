"""Reference implementations in other frameworks, for parity checks and the compare tool.

``torch_port``: the PyTorch port's architecture; ``official``: a PyTorch translation of the
official MXNet/Gluon presets (parameter counts, benchmarks). Both need the ``torch`` extra.
``gluon``: the official presets in Gluon itself, scripts for a separate MXNet interpreter.
"""
