"""The OpenAI-compatible server (``vllm serve``, front end and engine in separate processes):
steering through ``vllm_xargs``, a bad request answered 400 alone while the server stays up."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from .conftest import m2iv_config
from .helpers import prompt

IDS = prompt(9, 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_dirs, workdir, vectors):
    port = _free_port()
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}  # the real server layout
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
           str(model_dirs["llama"]), "--host", "127.0.0.1", "--port", str(port), "--dtype",
           "float32", "--max-model-len", "256", "--kv-cache-memory-bytes", str(64 * 2**20),
           "--enforce-eager", "--seed", "0", "--block-size", "32",
           "--additional-config", json.dumps(m2iv_config(workdir, "llama"))]
    log = open(workdir / "server.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}: "
                            f"{(workdir / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("vllm serve did not become healthy in 300 s")
            time.sleep(1)
        yield url, str(model_dirs["llama"])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _complete(server, xargs=None):
    url, model = server
    body = {"model": model, "prompt": IDS, "max_tokens": 8, "temperature": 0.0,
            "ignore_eos": True}
    if xargs is not None:
        body["vllm_xargs"] = xargs
    req = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_server_steers_per_request(server, llm_steer):
    status, plain = _complete(server)
    assert status == 200
    status, steered = _complete(server, {"m2iv": "a", "m2iv_strength": 0.5})
    assert status == 200
    offline = llm_steer.generate([{"prompt_token_ids": IDS}], _params("a", 0.5), use_tqdm=False)
    assert steered["choices"][0]["text"] == offline[0].outputs[0].text
    assert steered["choices"][0]["text"] != plain["choices"][0]["text"]


def _params(name, strength):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                          extra_args={"m2iv": {"vectors": name, "strength": strength}})


@pytest.mark.parametrize("xargs,match", [
    ({"m2iv": "nope"}, "'nope' is not served here"),
    ({"m2iv": "a", "m2iv_strength": "strong"}, "must be a number"),
])
def test_server_bad_request_is_400_and_server_stays_up(server, xargs, match):
    before = _complete(server, {"m2iv": "a"})
    status, body = _complete(server, xargs)
    assert status == 400, body
    assert match in json.dumps(body)
    after = _complete(server, {"m2iv": "a"})
    assert after[0] == 200 and after[1]["choices"] == before[1]["choices"]
