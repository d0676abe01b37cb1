"""The llama.cpp yardstick's plumbing without a llama.cpp build: where its converter is looked
for, which GGUF a benchmark asks for, and its server's command line."""

import pytest

from benchmarks import llama_cpp


def _checkout(tmp_path):
    tree = tmp_path / "llama.cpp"
    (tree / "build" / "bin").mkdir(parents=True)
    (tree / "convert_hf_to_gguf.py").write_text("")
    server = tree / "build" / "bin" / "llama-server"
    server.write_text("")
    return tree, server


def test_the_converter_is_found_above_the_binary(tmp_path):
    tree, server = _checkout(tmp_path)
    assert llama_cpp.checkout_of(str(server)) == tree.resolve()


def test_a_binary_outside_a_checkout_is_refused_by_name(tmp_path):
    server = tmp_path / "bin" / "llama-server"
    server.parent.mkdir()
    server.write_text("")
    with pytest.raises(SystemExit, match="no convert_hf_to_gguf.py above"):
        llama_cpp.checkout_of(str(server))


def test_an_unknown_gguf_type_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDSERVE_CACHE", str(tmp_path / "cache"))
    _, server = _checkout(tmp_path)
    with pytest.raises(SystemExit, match="q3_x"):
        llama_cpp.ensure_gguf(str(tmp_path), "q3_x", str(server))


def test_a_cached_gguf_is_reused_without_converting(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDSERVE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    folder.mkdir()
    cached = tmp_path / "cache" / "gguf" / "model-q8_0.gguf"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"GGUF")
    # no checkout, no binary: a conversion would fail
    assert llama_cpp.ensure_gguf(str(folder), "q8_0", "/nowhere/llama-server") == cached


def test_a_failing_converter_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDSERVE_CACHE", str(tmp_path / "cache"))
    tree, server = _checkout(tmp_path)
    (tree / "convert_hf_to_gguf.py").write_text("import sys\nsys.exit('no tokenizer here')\n")
    with pytest.raises(SystemExit, match="no tokenizer here"):
        llama_cpp.ensure_gguf(str(tmp_path), "q8_0", str(server))
    assert not list((tmp_path / "cache" / "gguf").iterdir())  # nothing half written


def test_server_command_has_one_slot_per_concurrent_request():
    cmd = llama_cpp.server_cmd("llama-server", "m.gguf", 8080, slots=16, threads=2)
    assert cmd[cmd.index("-np") + 1] == "16"
    assert cmd[cmd.index("-c") + 1] == str(16 * 2048)
    assert cmd[cmd.index("-t") + 1] == "2"
