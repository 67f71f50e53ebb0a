"""Input data: the embedded `aff_multiscale` TFDS builder, dataset sources and grain pipelines.

Entry points: `aff_jax.data.pipeline.get_info(name)` and `make_iterator(name, split, ...)`.
"""
