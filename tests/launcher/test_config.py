"""Config: every spec flag with its env var and default; CLI > env > ti_model_config.json >
default; bad values name the flag."""

from __future__ import annotations

import json

import pytest

from launcher.config import Config, ConfigError, build_parser, load_config

SPEC_FLAGS = {  # flag -> env var, as the vendor's tables name them
    "--model-path": "MODEL_PATH",
    "--num-gpus": "TP",
    "--worker-num": "WORKER_NUM",
    "--limit-worker-concurrency": "MAX_CONCURRENCY",
    "--dtype": "DTYPE",
    "--seed": "SEED",
    "--max-model-len": "MAX_MODEL_LEN",
    "--quantization": "QUANTIZATION",
    "--use-lookahead": "USE_LOOKAHEAD",
    "--num-speculative-tokens": "NUM_SPECULATIVE_TOKENS",
    "--api-keys": "OPENAI_API_KEYS",
    "--gpu_memory_utilization": "GPU_MEMORY_UTILIZATION",
    "--enforce-eager": "ENFORCE_EAGER",
    "--ds-dtype": "DS_DTYPE",
    "--max-batch-size": "MAX_BATCH_SIZE",
    "--batch-wait-timeout": "BATCH_WAIT_TIMEOUT",
}


def test_defaults_follow_the_spec():
    c = load_config([], {})
    assert c.model_path == "/data/model"
    assert c.worker_num == 1 and c.limit_worker_concurrency == 128
    assert c.quantization == "none" and c.use_lookahead is False
    assert c.num_speculative_tokens == 8 and c.max_num_seqs == 256
    assert c.gpu_memory_utilization == 0.9 and c.enforce_eager is True
    assert c.port == 8501 and c.api_keys == ()
    assert (c.ds_dtype, c.max_batch_size, c.batch_wait_timeout) == ("float16", 16, 0.1)


@pytest.mark.parametrize("flag", sorted(SPEC_FLAGS))
def test_help_shows_each_spec_flag_with_its_env_var(flag):
    help_text = build_parser().format_help()
    assert flag in help_text
    assert SPEC_FLAGS[flag] in help_text


def test_vllm_spellings_are_accepted():
    c = load_config(
        [
            "--model",
            "/m",
            "--tensor-parallel-size",
            "2",
            "--served-model-name",
            "x",
            "--trust-remote-code",
            "--use-v2-block-manager",
            "--gpu-memory-utilization",
            "0.5",
        ],
        {},
    )
    assert (c.model_path, c.num_gpus, c.model_id, c.trust_remote_code) == ("/m", 2, "x", True)
    assert c.gpu_memory_utilization == 0.5


def test_cli_beats_env_beats_default():
    env = {"WORKER_NUM": "3", "MAX_CONCURRENCY": "7"}
    c = load_config(["--worker-num", "2"], env)
    assert c.worker_num == 2
    assert c.limit_worker_concurrency == 7


@pytest.mark.parametrize(
    "text,value", [("1", True), ("true", True), ("0", False), ("false", False)]
)
def test_boolean_env_values(text, value):
    assert load_config([], {"USE_LOOKAHEAD": text}).use_lookahead is value


def test_flag_without_value_means_true():
    assert load_config(["--use-lookahead"], {}).use_lookahead is True
    assert load_config(["--enforce-eager", "0"], {}).enforce_eager is False


def test_api_keys_are_comma_separated():
    assert load_config([], {"OPENAI_API_KEYS": "sk-a, sk-b,,sk-c"}).api_keys == (
        "sk-a",
        "sk-b",
        "sk-c",
    )


def test_kv_cache_memory_accepts_units():
    assert load_config(["--kv-cache-memory", "512MiB"], {}).kv_cache_memory == 512 * 2**20
    assert load_config([], {"KV_CACHE_MEMORY": "2GiB"}).kv_cache_memory == 2 * 2**30


def test_model_file_fills_model_id_and_template_below_env(tmp_path):
    (tmp_path / "ti_model_config.json").write_text(
        json.dumps({"model_id": "Baichuan2-13B-Chat", "conv_template_name": "baichuan2-chat"})
    )
    c = load_config(["--model-path", str(tmp_path)], {})
    assert (c.model_id, c.conv_template) == ("Baichuan2-13B-Chat", "baichuan2-chat")
    c = load_config(["--model-path", str(tmp_path)], {"MODEL_ID": "mine"})
    assert (c.model_id, c.conv_template) == ("mine", "baichuan2-chat")


@pytest.mark.parametrize(
    "argv,env,flag",
    [
        (["--port", "0"], {}, "--port"),
        ([], {"TP": "zero"}, "TP"),
        (["--gpu-memory-utilization", "1.5"], {}, "--gpu-memory-utilization"),
        ([], {"USE_LOOKAHEAD": "maybe"}, "USE_LOOKAHEAD"),
        ([], {"QUANTIZATION": "int3"}, "QUANTIZATION"),
        (["--max-num-seqs", "0"], {}, "--max-num-seqs"),
        ([], {"KV_CACHE_MEMORY": "lots"}, "KV_CACHE_MEMORY"),
    ],
)
def test_bad_values_name_the_flag(argv, env, flag):
    with pytest.raises(ConfigError, match=flag):
        load_config(argv, env)


def test_config_round_trips_through_a_dict():
    c = load_config(["--api-keys", "a,b", "--seed", "3"], {})
    assert Config.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_cpu_compile_is_on_unless_turned_off():
    assert load_config([], {}).cpu_compile is True
    assert load_config([], {"CPU_COMPILE": "0"}).cpu_compile is False
    assert load_config(["--cpu-compile", "0"], {"CPU_COMPILE": "1"}).cpu_compile is False


@pytest.mark.parametrize(
    "env,device,expected",
    [
        ({}, "cuda", (None, "none")),  # continuous batching: DS_DTYPE is not used
        ({"SCHEDULER": "dynamic-batching"}, "cuda", ("float16", "none")),
        ({"SCHEDULER": "dynamic-batching", "DS_DTYPE": "bfloat16"}, "cuda", ("bfloat16", "none")),
        ({"SCHEDULER": "dynamic-batching", "DS_DTYPE": "int8"}, "cuda", (None, "ifq")),
        (
            {"SCHEDULER": "dynamic-batching", "DS_DTYPE": "int8", "QUANTIZATION": "fp8"},
            "cuda",
            (None, "fp8"),
        ),  # fmt: skip
        ({"SCHEDULER": "dynamic-batching", "DTYPE": "float32"}, "cuda", ("float32", "none")),
        ({"SCHEDULER": "dynamic-batching"}, "cpu", (None, "none")),  # half precision is slow
    ],
)
def test_ds_dtype_sets_dtype_and_quantization_in_dynamic_batching(env, device, expected):
    from launcher.serve import ds_image_settings

    c = ds_image_settings(load_config([], env), device)
    assert (c.dtype, c.quantization) == expected


def test_operations_flags_are_checked():
    with pytest.raises(ConfigError, match="--max-waiting-requests"):
        load_config(["--max-waiting-requests", "-1"], {})
    with pytest.raises(ConfigError, match="--stuck-step-timeout"):
        load_config([], {"STUCK_STEP_TIMEOUT": "0"})
    with pytest.raises(ConfigError, match="--shutdown-timeout"):
        load_config(["--shutdown-timeout", "-2"], {})
    c = load_config([], {"MAX_WAITING_TOKENS": "0", "SHUTDOWN_TIMEOUT": "5"})
    assert (c.max_waiting_tokens, c.shutdown_timeout) == (0, 5.0)


# Derived settings whose names differ from the Config field they come from.
_RENAMED = {
    "ShardSpec": {"lookahead": "use_lookahead", "collective_timeout_s": "collective_timeout"},
    "RouterSettings": {"max_concurrency": "limit_worker_concurrency"},
}


def _config_fields(cls) -> dict[str, str]:
    """cls's fields that a Config field sets -> that field's name."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(Config)}
    renamed = _RENAMED[cls.__name__]
    out = {f.name: renamed.get(f.name, f.name) for f in dataclasses.fields(cls)}
    return {k: v for k, v in out.items() if v in names and k != "model_path"}


def _classes():
    from router.settings import RouterSettings
    from shards.wire import ShardSpec

    return [ShardSpec, RouterSettings]


@pytest.mark.parametrize("cls", _classes(), ids=lambda c: c.__name__)
def test_derived_settings_hold_no_default_of_what_config_sets(cls):
    """Config is the one place a default lives (launcher/plan.py derives the rest): a default
    added to a derived field alone would drift from Config's."""
    import dataclasses

    mapped = _config_fields(cls)
    assert len(mapped) >= 10, mapped  # the mapping itself still finds the fields
    with_default = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name in mapped
        and (f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING)
    ]
    assert not with_default, f"{cls.__name__} has defaults of its own for {with_default}"


def test_plan_derives_every_setting_from_config():
    from launcher.plan import router_settings, shard_spec

    c = Config(cpu_compile=False, max_num_seqs=7, port=9001, use_lookahead=True)
    spec = shard_spec(c, "m", "ifq", 4096)
    settings = router_settings(c, "m", "name", ("s",), "ifq", 4096)
    for obj in (spec, settings):
        for field, source in _config_fields(type(obj)).items():
            want = getattr(c, source)
            if field in ("quantization",):
                want = "ifq"  # as resolved
            elif field == "max_num_batched_tokens":
                want = 4096  # Config's None: max(context, 2048)
            elif field == "max_model_len":
                want = 4096
            elif field == "master_port":
                want = 0  # Config's None: chosen per group
            assert getattr(obj, field) == want, (type(obj).__name__, field)


def test_the_offline_api_takes_config_defaults():
    """LLM's keywords that name a Config field default to None, meaning Config's value."""
    import dataclasses
    import inspect

    from launcher.llm import LLM

    names = {f.name for f in dataclasses.fields(Config)}
    params = inspect.signature(LLM.__init__).parameters
    own = [n for n, p in params.items() if n in names and p.default is not None]
    assert not own, f"LLM has defaults of its own for {own}"
    assert "config" in params
