"""Input data: the embedded `aff_multiscale` (classification) and `aff_stopsign` (segmentation)
TFDS builders, dataset sources and grain pipelines.

Entry points: `aff_jax.data.pipeline.get_info(name)` and `make_iterator(name, split, ...)`.
"""
