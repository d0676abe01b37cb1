"""HTTP clients of an OpenAI-compatible server: `shardserve chat` and `shardserve bench`."""
