"""`python3 -m vllm.entrypoints.openai.api_server [vLLM flags]`: shardserve's `serve` with the
same arguments (--model, --served-model-name, --tensor-parallel-size, --trust-remote-code,
--quantization, --use-v2-block-manager, --use-lookahead, --num-speculative-tokens, ...)."""

import sys

from launcher.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
