"""Requests, in rooms: `http/` (the API, its protocol, templates, tokenizer, streaming, metrics),
`engine/` (the step loop and its collaborators, the shard clients), `scheduling/` (the
scheduler, sequences, KV block accounting) and `lookahead/` (drafting). `settings`, `params` and
`assembly` tie them together. Never imports torch."""
