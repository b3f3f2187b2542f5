"""Wire codecs built on hiveengine.kernels: `none`, `fp16`, `bf16`, `int8` and `int4` (blockwise absmax), and the
robust aggregation (CenteredClip) a reducer may use in place of the mean."""

from hiveengine.codec.codecs import CODECS, BlockwiseCodec, Codec, FloatCodec, Payload, get_codec
from hiveengine.codec.robust import AGGREGATIONS, Aggregation, centered_clip, squared_norms

__all__ = [
    "AGGREGATIONS",
    "CODECS",
    "Aggregation",
    "BlockwiseCodec",
    "Codec",
    "FloatCodec",
    "Payload",
    "centered_clip",
    "get_codec",
    "squared_norms",
]
