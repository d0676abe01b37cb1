"""Requests: HTTP, validation, templates, tokenizer, scheduling, block accounting, streaming.
Never imports torch."""
