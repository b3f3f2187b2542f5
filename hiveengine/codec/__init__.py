"""Wire codecs built on hiveengine.kernels: `none`, `fp16`, `bf16`, `int8` and `int4` (blockwise absmax)."""

from hiveengine.codec.codecs import CODECS, BlockwiseCodec, Codec, FloatCodec, Payload, get_codec

__all__ = ["CODECS", "BlockwiseCodec", "Codec", "FloatCodec", "Payload", "get_codec"]
