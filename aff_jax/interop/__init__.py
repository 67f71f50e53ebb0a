"""Weight interchange with PyTorch (``torch``) and MXNet/Gluon (``mxnet``)."""
