"""A real OpenAI-compatible benchmark tool from PyPI (guidellm) drives the server for a short,
bounded run, through streamed chat completions, and reports no errored or incomplete request."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

GUIDELLM = Path(sys.executable).with_name("guidellm")
REQUESTS = 12


def test_guidellm_concurrent_run_has_no_errors(tiny_server, tiny_folder, tmp_path):
    assert GUIDELLM.exists() or shutil.which("guidellm"), "guidellm comes with the dev extras"
    out = tmp_path / "guidellm.json"
    run = subprocess.run(
        [
            str(GUIDELLM) if GUIDELLM.exists() else "guidellm",
            "run",
            "--backend",
            f"kind=openai_http,target={tiny_server.url},request_format=/v1/chat/completions",
            "--profile",
            "kind=concurrent,streams=4",
            "--constraint",
            f"kind=max_requests,count={REQUESTS}",
            "--data",
            "kind=synthetic_text,prompt_tokens=32,output_tokens=16",
            "--tokenizer",
            f"kind=huggingface_auto,model={tiny_folder}",
            "--output",
            f"kind=json,path={out}",
            "--disable-progress",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (bench,) = json.loads(out.read_text())["benchmarks"]
    totals = bench["metrics"]["request_totals"]
    assert totals == {"successful": REQUESTS, "errored": 0, "incomplete": 0, "total": REQUESTS}
    output_tokens = bench["metrics"]["output_token_count"]["successful"]["total_sum"]
    assert 0 < output_tokens <= 16 * REQUESTS
