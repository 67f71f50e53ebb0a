"""Read and write NDArray files with MXNet itself (run with the mxnet venv).

    python nd_io.py load PARAMS OUT.npz        # mx.nd.load -> npz, names and dtypes kept
    python nd_io.py save IN.npz PARAMS         # the npz arrays, in order, via mx.nd.save (V2)
    python nd_io.py save-np IN.npz PARAMS      # the same via npx.save, numpy-shape semantics (V3)

Used to check aff_jax.interop.mxnet against the real MXNet in both directions.
"""
import sys

import mxnet as mx
import numpy as np


def main():
    command, src, dst = sys.argv[1:]
    if command == 'load':
        loaded = mx.nd.load(src)
        np.savez(dst, **{name: array.asnumpy() for name, array in loaded.items()})
    elif command == 'save':
        with np.load(src) as arrays:
            mx.nd.save(dst, {name: mx.nd.array(arrays[name], dtype=arrays[name].dtype)
                             for name in arrays.files})
    elif command == 'save-np':
        mx.npx.set_np()
        with np.load(src) as arrays:
            mx.npx.save(dst, {name: mx.np.array(arrays[name], dtype=arrays[name].dtype)
                              for name in arrays.files})
    else:
        raise SystemExit(f'unknown command {command!r}; use load, save or save-np')


if __name__ == '__main__':
    main()
