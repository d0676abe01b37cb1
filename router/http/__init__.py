"""The HTTP surface: routes, the OpenAI-compatible protocol and its responses, chat templates,
the tokenizer and detokenizer, metrics, the chat page, and the server process itself."""
