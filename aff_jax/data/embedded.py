"""What the embedded, generated TFDS datasets (`multiscale.py`, `stopsign.py`) share: a builder
that writes `record(split, index)` for every index of every split, and PNG encoding.

Nothing is downloaded; generation is seeded per (split, index), so every build writes the same
bytes. PNG encoding uses pillow, so neither generating nor reading needs TensorFlow.
"""

import io
import sys

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) or (H, W) uint8 array (RGB or single-channel 'L')."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format='PNG', compress_level=1)
    return buffer.getvalue()


class GeneratedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A TFDS builder of a generated dataset; prepare with `file_format='array_record'`.

    Subclasses set `SPLIT_SIZES` ({split: number of examples}), `SUPERVISED_KEYS` and define
    `features()` and `record(split, index)`; the description is their module's docstring.
    """

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'First release.'}
    SPLIT_SIZES: dict = {}
    SUPERVISED_KEYS: tuple = ()

    def features(self) -> tfds.features.FeaturesDict:
        raise NotImplementedError

    def record(self, split: str, index: int) -> dict:
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        # dataset_info_from_configs() needs the builder to live in its own package; build directly.
        return tfds.core.DatasetInfo(
            builder=self,
            description=sys.modules[type(self).__module__].__doc__,
            features=self.features(),
            supervised_keys=self.SUPERVISED_KEYS,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # generated locally, nothing to download
        return {split: self._generate_examples(split) for split in self.SPLIT_SIZES}

    def _generate_examples(self, split):
        for index in range(self.SPLIT_SIZES[split]):
            yield index, self.record(split, index)
