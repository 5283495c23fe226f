"""The tokenizer of a Hugging Face checkpoint folder (tokenizer.json through `tokenizers`, or a
SentencePiece tokenizer.model), with chat templates and streaming decoding; ids as `transformers` gives."""

from tokenizer.tokenizer import StreamDecoder, Tokenizer, TokenizerError

__all__ = ["Tokenizer", "StreamDecoder", "TokenizerError"]
