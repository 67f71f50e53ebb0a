"""Gluon (MXNet 1.9.1) code, run as scripts by a separate interpreter that has mxnet.

Nothing here is imported by aff_jax (mxnet needs numpy<1.24 and CPython <= 3.11): the files
are executed with this directory on ``sys.path``. ``official_gluon``: the official presets'
Gluon models; ``compare_run.py``: the MXNet side of ``python -m aff_jax.compare``.
"""
import pathlib

DIRECTORY = pathlib.Path(__file__).parent
