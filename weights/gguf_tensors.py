"""What every GGUF conversion here shares: a tensor's Hugging Face name through a name map,
and its values dequantized to float32 in Hugging Face's (out, in) layout."""

from __future__ import annotations

import numpy as np
from gguf.quants import dequantize


def hf_name(gguf_name: str, table: dict[str, str]) -> str:
    """GGUF name -> Hugging Face name through `table`, whose keys write a layer index as {i}."""
    block, _, rest = gguf_name.partition(".")
    if block == "blk":
        layer, _, rest = rest.partition(".")
        return table[f"blk.{{i}}.{rest}"].format(i=layer)
    return table[gguf_name]


def dequantized(tensor) -> np.ndarray:
    """A GGUF reader's tensor as float32; GGUF lists dimensions (ne0, ne1) = (in, out)."""
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False).reshape(shape)
