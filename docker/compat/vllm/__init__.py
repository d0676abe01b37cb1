"""The spec's vLLM-style command line, `python3 -m vllm.entrypoints.openai.api_server ...`,
served by shardserve. This package is on PYTHONPATH in the container image only."""
