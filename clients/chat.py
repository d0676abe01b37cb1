"""`shardserve chat`: the vendor's chat CLI demo: a multi-turn conversation streamed from
/v1/chat/completions. Speaks HTTP only; input and output are injectable for tests."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

import httpx

from clients.sse import DONE, base_url, delta_text, error_message, event_error, parse_sse_line

EXIT_COMMANDS = ("/exit", "/quit")


class ChatError(Exception):
    """A turn the server (or the network) refused; the conversation goes on without it."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="shardserve chat",
        description="Chat with a running server; /exit, /quit or Ctrl-D ends the session.",
    )
    p.add_argument("--server", default="http://127.0.0.1:8501", help="server base URL")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top_p", "--top-p", dest="top_p", type=float, default=1.0)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--token", default=None, help="API key, sent as Authorization: Bearer")
    p.add_argument(
        "--timeout", type=float, default=600.0, help="seconds without progress before giving up"
    )
    args = p.parse_args(argv)
    try:
        base_url(args.server, "--server")
    except ValueError as e:
        p.error(str(e))
    return args


def _endpoint(server: str) -> str:
    return f"{base_url(server, '--server')}/v1/chat/completions"


def stream_reply(
    client: httpx.Client,
    args: argparse.Namespace,
    messages: list[dict],
    write: Callable[[str], None],
) -> str:
    """Sends the conversation, writes the reply as it streams, and returns its full text."""
    body = {
        "messages": messages,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "max_tokens": args.max_tokens,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    parts: list[str] = []
    started = False
    try:
        with client.stream("POST", _endpoint(args.server), json=body, headers=headers) as r:
            if r.status_code != 200:
                raise ChatError(error_message(r.status_code, r.read()))
            write("Assistant: ")
            started = True
            done = False
            for line in r.iter_lines():
                event = parse_sse_line(line)
                if event == DONE:
                    done = True
                    break
                if not isinstance(event, dict):
                    continue
                err = event_error(event)
                if err is not None:
                    raise ChatError(f"server error mid-reply: {err}")
                text = delta_text(event)
                if text:
                    parts.append(text)
                    write(text)
            if not done:
                raise ChatError("the stream ended before [DONE]")
    except httpx.HTTPError as e:
        raise ChatError(f"{type(e).__name__}: {str(e) or 'no detail'}") from e
    finally:
        # A reply that began must end its line, even if it broke off.
        if started:
            write("\n")
    return "".join(parts)


def chat_loop(
    client: httpx.Client,
    args: argparse.Namespace,
    read: Callable[[str], str],
    write: Callable[[str], None],
) -> int:
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    while True:
        try:
            user = read("User: ")
        except EOFError:
            write("\n")
            return 0
        if user.strip() in EXIT_COMMANDS:
            return 0
        if not user.strip():
            continue
        messages.append({"role": "user", "content": user})
        try:
            reply = stream_reply(client, args, messages, write)
        except ChatError as e:
            # Drop the unanswered turn so the history never holds two user messages in a row.
            messages.pop()
            write(f"error: {e}\n")
            continue
        messages.append({"role": "assistant", "content": reply})


def _stdout_write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def main(
    argv: list[str] | None = None,
    *,
    read: Callable[[str], str] = input,
    write: Callable[[str], None] | None = None,
    client: httpx.Client | None = None,
) -> int:
    """Exit status: 0 on /exit, /quit or end of input; 130 on Ctrl-C; 2 for bad flags.

    `read` behaves like `input` (EOFError ends the session); `write` receives every piece of
    output; `client` lets a caller observe or route the HTTP traffic.
    """
    args = parse_args(argv)
    write = write or _stdout_write
    # The launcher logs at INFO; httpx would then print a line per request into the chat.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    owned = client is None
    if client is None:
        client = httpx.Client(timeout=args.timeout)
    try:
        return chat_loop(client, args, read, write)
    except KeyboardInterrupt:
        write("\n")
        return 130
    finally:
        if owned:
            client.close()


if __name__ == "__main__":
    sys.exit(main())
