"""Tokenizers of Hugging Face checkpoints: tokenizer.json (via `tokenizers`) or SentencePiece
tokenizer.model, with chat templates and streaming decoding."""

from tokenizer.tokenizer import StreamDecoder, Tokenizer, TokenizerError

__all__ = ["Tokenizer", "StreamDecoder", "TokenizerError"]
