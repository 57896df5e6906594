"""The Ray Serve application against the official `openai` client, on 127.0.0.1: greedy
text equals raytron's own generation, bad requests get a 400 and the server goes on, the
API key is enforced, and concurrent requests decode together with the same results.
No request breaks the server: each bound is a 4xx naming the field, a replica beyond its
limit answers 429, a request past its time-out 504. Replicas ask Ray for the GPUs they
use, and are placed by them."""

import concurrent.futures
import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from openai import (
    AuthenticationError,
    BadRequestError,
    InternalServerError,
    NotFoundError,
    OpenAI,
    RateLimitError,
)
from pydantic import ValidationError

from raytron.model.engine import EngineLimits
from raytron.model.sampling import Sampling
from raytron.pipelines.chat import render
from raytron.platform.config.schema import ConfigError
from raytron.platform.models import load_model
from raytron.platform.serving.adapter_names import AdapterSettings
from raytron.platform.serving.command import replica_gpus
from raytron.platform.serving.limits import Limits

from model_runs import (
    hf_chat_model,
    peft_adapters,
    run_cli,
    small_model,
    small_tokenizer,
    write_run,
)

KEY = "test-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("runs"), "served",
                     small_model(512, max_seq_len=128), small_tokenizer())


@pytest.fixture(scope="module")
def adapters(run_dir, tmp_path_factory) -> Path:
    """PEFT's random LoRA adapters "one" and "two" on the served model, in a folder."""
    folder = tmp_path_factory.mktemp("peft")
    return peft_adapters(run_dir, folder, {
        "one": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "two": {"r": 8, "lora_alpha": 8, "target_modules": ["o_proj", "down_proj"]},
    }) / "adapters"


@pytest.fixture(scope="module")
def served(ray_session, run_dir, adapters):
    """The model as "small", with adapter "one" given and "two" found in its folder."""
    from ray import serve

    from raytron.platform.serving.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(str(run_dir), "small", api_key=KEY, adapters=AdapterSettings(
        {"one": str(adapters / "one")}, str(adapters), max_adapters=2)),
              name="raytron", route_prefix="/")
    yield run_dir, f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def client(served) -> OpenAI:
    return OpenAI(base_url=served[1] + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def local(served):
    return load_model(served[0])


@pytest.fixture(scope="module")
def tight(served) -> str:
    """The model again, at /tight: a replica that holds one request, for 2 s at most."""
    from ray import serve

    from raytron.platform.serving.app import build_app

    serve.run(build_app(str(served[0]), "small", limits=Limits(1, 2.0)), name="tight",
              route_prefix="/tight")
    return served[1] + "/tight"


def post(url: str, body: bytes, content_type: str | None = "application/json",
         headers: dict | None = None) -> tuple[int, dict, dict]:
    """(status, headers, JSON) of a POST with the key, raw bytes as the body."""
    headers = {"Authorization": f"Bearer {KEY}", **(headers or {})}
    if content_type:
        headers["Content-Type"] = content_type
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, dict(answer.headers), json.loads(answer.read())
    except urllib.error.HTTPError as refused:
        return refused.code, dict(refused.headers), json.loads(refused.read())


def test_completions_give_raytrons_greedy_text(client, local):
    response = client.completions.create(model="small", prompt=["The import", "A class"],
                                         max_tokens=12, temperature=0)
    expected = local.generate(["The import", "A class"], max_new_tokens=12, greedy=True)
    assert [c.text for c in response.choices] == [g.text for g in expected]
    assert [c.finish_reason for c in response.choices] == [g.finish_reason for g in expected]
    assert response.usage.completion_tokens == sum(len(g.tokens) for g in expected)
    assert response.object == "text_completion" and response.model == "small"


def test_chat_completions_use_the_chat_template(client, local):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    response = client.chat.completions.create(model="small", messages=messages, max_tokens=8,
                                              temperature=0)
    expected = local.generate(render(messages, add_generation_prompt=True), 8, greedy=True)
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected[0].text


def test_streams_carry_the_same_text_and_end_with_a_reason(client, local):
    expected = local.generate("The import", 12, greedy=True)[0]
    pieces, reasons = [], []
    for chunk in client.completions.create(model="small", prompt="The import", max_tokens=12,
                                           temperature=0, stream=True):
        pieces.append(chunk.choices[0].text)
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == expected.text and len(pieces) > 3
    assert reasons[-1] == expected.finish_reason and set(reasons[:-1]) == {None}
    chat = [{"role": "user", "content": "hi"}]
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in
                       client.chat.completions.create(model="small", messages=chat,
                                                      max_tokens=8, temperature=0,
                                                      stream=True))
    assert streamed == local.generate(render(chat, add_generation_prompt=True), 8,
                                      greedy=True)[0].text


@pytest.mark.parametrize(("fields", "param", "says"), [
    ({"prompt": ""}, "prompt", "non-empty"),
    ({"temperature": -1}, "temperature", "at least 0 and at most 2, not -1"),
    ({"temperature": 2.5}, "temperature", "at most 2"),
    ({"top_p": 0}, "top_p", "more than 0 and at most 1"),
    ({"max_tokens": 128}, "max_tokens", "at most 127"),
    ({"max_tokens": 0}, "max_tokens", "at least 1"),
    ({"max_tokens": 10**400}, "max_tokens", "(401 characters)"),
    ({"prompt": "word " * 200}, "prompt", "the model's context is 128 tokens"),
    ({"stop": [""]}, "stop", "up to 4 strings, each of 1 to 64 characters"),
    ({"stop": list("abcde")}, "stop", "up to 4 strings"),
    ({"stop": "x" * 65}, "stop", "1 to 64 characters"),
    ({"seed": 2**64}, "seed", "at most 9223372036854775807"),
    ({"n": 17}, "n", "at most 16"),
    ({"n": 10**400}, "n", "at most 16"),
    ({"prompt": ["a"] * 5000}, "prompt", "5000 completions; a request may ask for at most 64"),
    ({"prompt": ["a"] * 8, "n": 9}, "prompt", "8 prompts x n 9"),
    ({"presence_penalty": 2.5}, "presence_penalty", "at least -2 and at most 2"),
    ({"frequency_penalty": -3}, "frequency_penalty", "at least -2"),
    ({"repetition_penalty": 0}, "repetition_penalty", "at least 0.01"),
])
def test_a_bad_request_gets_400_naming_the_field_and_the_server_goes_on(client, fields, param,
                                                                        says):
    with pytest.raises(BadRequestError) as refused:
        client.completions.create(model="small", prompt="a", max_tokens=2, extra_body=fields)
    assert refused.value.status_code == 400
    assert refused.value.body["type"] == "invalid_request_error"
    assert refused.value.body["param"] == param and says in refused.value.body["message"]
    assert client.completions.create(model="small", prompt="a", max_tokens=2).choices


@pytest.mark.parametrize(("body", "content_type", "status", "param", "says"), [
    (b'{"prompt": "a", "temperature": NaN}', "application/json", 400, "temperature",
     "not nan"),
    (b'{"prompt": "a", "top_p": -Infinity}', "application/json", 400, "top_p", "not -inf"),
    (b'{"prompt": "a", "presence_penalty": 1e400}', "application/json", 400,
     "presence_penalty", "not inf"),
    (b'{"prompt": "a\\ud800b"}', "application/json", 400, "prompt", "not valid Unicode"),
    (b"[" * 100_000 + b"]" * 100_000, "application/json", 400, None, "nested too deeply"),
    (b'{"prompt": "a", "n": ' + b"1" * 5000 + b"}", "application/json", 400, None,
     "an integer has 5000 digits"),
    (b'{"prompt": "' + b"a" * (1 << 20) + b'"}', "application/json", 413, None,
     "1048576 bytes"),
    (b"\xff{}", "application/json", 400, None, "not valid JSON"),
    (b"[]", "application/json", 400, None, "a JSON object"),
    (b'{"prompt": "a"}', "text/plain", 415, None, "Content-Type: application/json"),
    (b'{"prompt": "a"}', None, 415, None, "Content-Type: application/json"),
])
def test_no_body_breaks_the_server(served, client, body, content_type, status, param, says):
    """What the client library would not send: each a 4xx, never a 500."""
    code, _, answer = post(served[1] + "/v1/completions", body, content_type)
    assert (code, answer["error"]["type"]) == (status, "invalid_request_error")
    assert answer["error"]["param"] == param and says in answer["error"]["message"]
    assert client.completions.create(model="small", prompt="a", max_tokens=2).choices


def test_no_cors_header_is_sent(served):
    """A web page's script may not read the answers: no Access-Control-Allow-Origin."""
    code, headers, _ = post(served[1] + "/v1/completions",
                            b'{"prompt": "a", "max_tokens": 2}',
                            headers={"Origin": "http://example.com"})
    assert code == 200
    assert not any(name.lower().startswith("access-control-") for name in headers)


def test_a_tiny_temperature_is_greedy_and_penalties_apply(client, local):
    """1e-39 once divided the logits into infinities; the penalties give what raytron's
    own generation gives with them (and not the greedy repeats)."""
    prompts = ["The import", "A class"]
    response = client.completions.create(model="small", prompt=prompts, max_tokens=12,
                                         temperature=1e-39)
    greedy = local.generate(prompts, max_new_tokens=12, greedy=True)
    assert [c.text for c in response.choices] == [g.text for g in greedy]
    penalties = {"frequency_penalty": 1.5, "presence_penalty": 0.5, "repetition_penalty": 1.3}
    response = client.completions.create(model="small", prompt=prompts, max_tokens=12,
                                         temperature=0, extra_body=penalties)
    expected = local.generator.generate(prompts, 12, Sampling(temperature=0, **penalties))
    assert [c.text for c in response.choices] == [g.text for g in expected]
    assert [g.text for g in expected] != [g.text for g in greedy]


def test_token_id_prompts_echo_and_logprobs_are_the_models_own(client, local):
    """lm-evaluation-harness's way of scoring: token ids in, echo with max_tokens 0 and
    logprobs 1 out; each token's logprob is the model's log-softmax, the first null."""
    import torch

    ids = [local.generator.encode("The import statement"), local.generator.encode("x = 1")]
    scored = client.completions.create(model="small", prompt=ids, max_tokens=0, echo=True,
                                       logprobs=1)
    for prompt, choice in zip(ids, scored.choices, strict=True):
        with torch.no_grad():
            expected = local.model(torch.tensor([prompt]))[0].log_softmax(-1)
        lp = choice.logprobs
        assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(prompt)
        assert lp.token_logprobs[1:] == pytest.approx(
            [float(expected[i, t]) for i, t in enumerate(prompt[1:])], abs=1e-4)
        assert all(len(top) in (1, 2) for top in lp.top_logprobs[1:])
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
        assert choice.text == local.tokenizer.decode(prompt)
    generated = client.completions.create(model="small", prompt=ids[0], max_tokens=5,
                                          temperature=0, logprobs=2)
    greedy = local.generate(["The import statement"], 5, greedy=True)[0]
    assert generated.choices[0].text == greedy.text
    tokens = generated.choices[0].logprobs
    assert len(tokens.token_logprobs) == 5 and all(
        max(top.values()) == pytest.approx(chosen) for top, chosen in  # greedy: the top one
        zip(tokens.top_logprobs, tokens.token_logprobs, strict=True))
    chat = client.chat.completions.create(model="small", max_tokens=3, temperature=0,
                                          messages=[{"role": "user", "content": "hi"}],
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(entry.top_logprobs) in (2, 3) for entry in content)


def test_tokenize_and_detokenize_as_vllm_does(served, local):
    base = served[1]
    code, _, answer = post(base + "/tokenize", json.dumps({"prompt": "A class"}).encode())
    assert code == 200 and answer["tokens"] == local.generator.encode("A class")
    assert answer["count"] == len(answer["tokens"]) and answer["max_model_len"] == 128
    code, _, answer = post(base + "/detokenize", json.dumps(
        {"tokens": answer["tokens"]}).encode())
    assert code == 200 and answer["prompt"].endswith("A class")
    code, _, answer = post(base + "/detokenize", json.dumps({"tokens": [10**6]}).encode())
    assert code == 400 and answer["error"]["param"] == "tokens"


def test_a_client_that_leaves_frees_its_slot_and_health_answers_meanwhile(served, client):
    """A stream of 100 tokens, abandoned after its first pieces: its sequence leaves the
    engine; /health answers in under 100 ms while a long decode runs."""
    stats = served[1] + "/stats"

    def running() -> int:
        request = urllib.request.Request(stats, headers={"Authorization": f"Bearer {KEY}"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read())["running"]

    stream = client.completions.create(model="small", prompt="The", max_tokens=100,
                                       temperature=0, stream=True, extra_body={
                                           "repetition_penalty": 1.3})
    next(iter(stream))
    started = time.perf_counter()
    with urllib.request.urlopen(served[1] + "/health", timeout=30) as health:
        assert health.status == 200
    assert time.perf_counter() - started < 0.1
    assert running() == 1
    stream.close()
    deadline = time.time() + 10
    while running() and time.time() < deadline:
        time.sleep(0.05)
    assert running() == 0


def test_usage_comes_last_in_a_stream_when_asked_for(client):
    chunks = list(client.completions.create(model="small", prompt=["a", "b"], max_tokens=4,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_a_full_replica_answers_429_and_a_slow_request_504(tight):
    """The replica at /tight holds one request: one whose body never comes holds it; the
    next gets a 429 with Retry-After, the held one a 504 after 2 s, then all is served."""
    port = int(tight.split(":")[-1].split("/")[0])
    client = OpenAI(base_url=tight + "/v1", api_key="none", max_retries=0)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as held:
        held.sendall(b"POST /tight/v1/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        # until the held one reaches the replica and while it holds it (2 s): on a busy
        # machine the proxy may take over a second to route it
        deadline, refused = time.time() + 8, None
        while refused is None and time.time() < deadline:
            try:
                client.completions.create(model="small", prompt="a", max_tokens=1)
            except RateLimitError as error:
                refused = error
            except InternalServerError as error:  # Serve's 503: the proxy's queue (of one)
                assert error.status_code == 503  # holds the held one until it is routed
        assert refused is not None, "no 429 while a request was held"
        assert refused.response.headers["retry-after"] == "1"
        assert "--max-queued" in refused.body["message"]
        assert held.recv(4096).startswith(b"HTTP/1.1 504")
    assert client.completions.create(model="small", prompt="a", max_tokens=2).choices


def test_invalid_json_gets_400_and_the_key_is_enforced(served, client):
    base = served[1]
    code, _, answer = post(base + "/v1/completions", b"{not json")
    assert code == 400 and "not valid JSON" in answer["error"]["message"]
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=base + "/v1", api_key=KEY + "x", max_retries=0).completions.create(
            model="small", prompt="a", max_tokens=2)
    assert [m.id for m in client.models.list().data] == ["small", "small:one", "small:two"]
    with urllib.request.urlopen(base + "/health", timeout=30) as health:
        assert health.status == 200


def test_concurrent_requests_decode_together_and_give_what_each_gives_alone(client, local):
    """Streamed and plain requests, in one batch of the engine."""
    prompts = [f"def f{i}(x):" for i in range(12)]

    def complete(prompt: str) -> str:
        if prompt.endswith(("1(x):", "4(x):", "7(x):")):
            return "".join(chunk.choices[0].text for chunk in client.completions.create(
                model="small", prompt=prompt, max_tokens=10, temperature=0, stream=True))
        return client.completions.create(model="small", prompt=prompt, max_tokens=10,
                                         temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        texts = list(pool.map(complete, prompts))
    assert texts == [g.text for g in local.generate(prompts, 10, greedy=True, batch_size=1)]


def test_adapters_and_the_base_decode_together_as_each_alone(client, local):
    """Requests for the base, adapter "one" (given) and "two" (from the folder), at
    once: each gives what it gives alone, and the adapters change the text."""
    calls = [(model, f"def f{i}(x):") for i in range(3)
             for model in ("small", "small:one", "two")]

    def complete(call: tuple[str, str]) -> str:
        response = client.completions.create(model=call[0], prompt=call[1], max_tokens=10,
                                             temperature=0)
        assert response.model == call[0]
        return response.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        together = list(pool.map(complete, calls))
    assert together == [complete(call) for call in calls]
    assert together[::3] == [g.text for g in local.generate(
        [prompt for _, prompt in calls[::3]], 10, greedy=True, batch_size=1)]
    assert len(set(together[:3])) == 3
    assert client.chat.completions.create(model="small:two", max_tokens=4, messages=[
        {"role": "user", "content": "hi"}]).choices[0].message.content is not None


def test_an_unknown_model_is_a_404_in_openais_shape(served, client):
    for model in ("small:three", "three", "other", "small:../one"):
        with pytest.raises(NotFoundError) as missing:
            client.completions.create(model=model, prompt="a", max_tokens=2)
        assert missing.value.body == {
            "message": f"the model '{model}' does not exist here: this server serves 'small' "
                       "and its adapters as 'small:NAME' (GET /v1/models lists them)",
            "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
    listed = client.models.list().data
    assert [(m.id, m.parent) for m in listed] == [
        ("small", None), ("small:one", "small"), ("small:two", "small")]
    assert client.completions.create(model="small", prompt="a", max_tokens=2).choices


def test_raytron_serve_runs_in_the_foreground_and_stops_on_ctrl_c(served, adapters, tmp_path,
                                                                   monkeypatch):
    """On a Ray of its own (the tests' Ray is on this machine too), quietly: no Ray
    tracebacks when it stops, no "Connecting to existing Serve app"."""
    import queue
    import signal
    import threading

    code, _, err = run_cli("serve", str(tmp_path), "--port", "1")
    assert code == 2 and "is no model" in err  # refused before Ray starts
    code, _, err = run_cli("serve", str(served[0]), "--adapter", "a/b=x")
    assert code == 2 and "an adapter's name is 1 to 64 letters" in err
    code, _, err = run_cli("serve", str(served[0]), "--adapter", f"x={tmp_path}")
    assert code == 2 and "neither a PEFT adapter folder (with adapter_config.json) nor" in err
    monkeypatch.setenv("RAYTRON_API_KEY", KEY)  # the other server answers with its key
    taken = served[1].rsplit(":", 1)[1]
    code, _, err = run_cli("serve", str(served[0]), "--port", taken)
    assert code == 2, err
    assert f"port {taken} on 127.0.0.1 is taken by another raytron serve (model small)" in err
    monkeypatch.delenv("RAYTRON_API_KEY")
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "raytron.platform.cli", "serve",
                                str(served[0]), "--name", "cli", "--port", str(port),
                                "--max-replicas", "2", "--adapter", f"mine={adapters}/one"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stdout],
                              daemon=True)
    reader.start()
    output = []
    deadline = time.monotonic() + 300
    try:
        while not output or "Ctrl-C stops it" not in output[-1]:  # it says when it is ready
            try:
                output.append(lines.get(timeout=max(deadline - time.monotonic(), 0)))
            except queue.Empty:
                pytest.fail("not ready in 300 s:\n" + "".join(output))
        cli = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert cli.completions.create(model="cli", prompt="A class", max_tokens=4).choices
        assert cli.completions.create(model="cli:mine", prompt="A", max_tokens=4).choices
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
    reader.join(timeout=30)
    while not lines.empty():
        output.append(lines.get())
    assert process.returncode == 0, "".join(output)
    for noise in ("Traceback", "graceful_shutdown", "Connecting to existing", "(raylet)"):
        assert noise not in "".join(output), "".join(output)
    assert any(f"at http://127.0.0.1:{port}/v1 with 1-2 (autoscaled)" in line
               and "adapters 'cli:mine'" in line for line in output)
    code, _, err = run_cli("serve", str(served[0]), "--replicas", "2", "--max-replicas", "3")
    assert code == 2 and "give one of them" in err


def test_each_request_is_one_log_line_of_the_replica(served, client):
    import ray

    client.completions.create(model="small", prompt="The import", max_tokens=5, temperature=0)
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    deadline = time.time() + 30
    while time.time() < deadline:
        lines = [line for path in logs.glob("replica_raytron_ModelServer_*.log")
                 for line in path.read_text().splitlines()
                 if "/v1/completions 200 |" in line and "completion tokens" in line]
        if lines:
            break
        time.sleep(0.5)
    assert re.search(r"/v1/completions 200 \| \d+ prompt \+ 5 completion tokens \| "
                     r"[\d.]+ s \| \d+ tok/s", "\n".join(lines))


def test_request_metrics_go_to_mlflow_in_windows(tmp_path):
    from mlflow import MlflowClient

    from raytron.platform.serving.metrics import EXPERIMENT, RequestMetrics, Served

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    metrics = RequestMetrics("small", uri)
    for seconds in (0.1, 0.2, 0.3, 0.4):
        metrics.record(Served("/v1/completions", 200, seconds, 5, 10))
    metrics.record(Served("/v1/completions", 400, 0.01))
    metrics.flush()
    mlflow = MlflowClient(uri)
    run = mlflow.search_runs([mlflow.get_experiment_by_name(EXPERIMENT).experiment_id])[0]
    logged = run.data.metrics
    assert logged["serve/requests"] == 5 and logged["serve/errors"] == 1
    assert logged["serve/completion_tokens"] == 40
    assert logged["serve/latency_p50_s"] == pytest.approx(0.2)
    assert run.info.run_name == "serve-small"


def test_serves_own_builder_takes_the_application_and_its_arguments(served, monkeypatch):
    """What `serve run module:application key=value` and a RayService's `args` do."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application

    from raytron.platform.serving.app import application

    monkeypatch.setenv("RAYTRON_API_KEY", "from-the-environment")
    app = call_user_app_builder_with_args_if_necessary(
        application, {"source": str(served[0]), "max_num_seqs": "4", "max_replicas": "3"})
    assert isinstance(app, Application)
    deployment = app._bound_deployment
    assert deployment.init_args == (str(served[0]), "served", "from-the-environment",
                                    EngineLimits(4), None, Limits(), AdapterSettings())
    assert deployment._deployment_config.autoscaling_config.max_replicas == 3
    # the tests' Ray declares no GPU: no GPU by default, Serve's one CPU kept
    assert deployment.ray_actor_options == {"num_gpus": 0, "num_cpus": 1}
    packed = call_user_app_builder_with_args_if_necessary(
        application, {"source": str(served[0]), "num_gpus": "0.5"})
    assert packed._bound_deployment.ray_actor_options["num_gpus"] == 0.5
    with pytest.raises(Exception, match="source"):
        call_user_app_builder_with_args_if_necessary(application, {"name": "x"})
    adapted = call_user_app_builder_with_args_if_necessary(application, {
        "source": str(served[0]), "adapters": {"one": "/adapters/one"}, "max_adapters": "4"})
    assert adapted._bound_deployment.init_args[-1] == AdapterSettings(
        {"one": "/adapters/one"}, None, 4, 16)
    with pytest.raises(Exception, match="an adapter's name is"):
        call_user_app_builder_with_args_if_necessary(application, {
            "source": str(served[0]), "adapters": {"../x": "/adapters/one"}})


def test_num_gpus_defaults_by_the_cluster_and_refuses_what_ray_cannot_give(tmp_path):
    from raytron.platform.serving.app import ServeArgs

    assert (replica_gpus(None, 2), replica_gpus(None, 0), replica_gpus(0.5, 2)) == (1, 0, 0.5)
    assert replica_gpus(0, 0) == 0
    with pytest.raises(ConfigError, match=r"--num-gpus 1 asks for GPUs.*has none\. Fix: give "
                                          r"--num-gpus 0"):
        replica_gpus(1, 0)
    for value, why in (("-1", "is out of range: give at least 0"), ("nan", "is out of range"),
                       ("1.5", "GPUs per replica: Ray gives a replica a fraction of one GPU "
                               "or whole GPUs")):
        code, _, err = run_cli("serve", str(tmp_path), "--num-gpus", value)
        assert code == 2 and f"argument --num-gpus: {value} {why}" in err, err
        with pytest.raises(ValidationError, match="num_gpus"):
            ServeArgs(source="runs/x", num_gpus=value)
    assert ServeArgs(source="runs/x", num_gpus="0.5").num_gpus == 0.5
    code, out, _ = run_cli("serve", "--help")
    assert code == 2 and "--num-gpus G" in out and "0.5: two per GPU" in out


def test_replicas_are_placed_by_the_gpus_they_ask_for(run_dir):
    """On a Ray that declares 2 GPUs (there are none), 3 replicas of 1 GPU: 2 run and hold
    both GPUs, the 3rd waits for one though CPUs are free; a GPU id without CUDA leaves
    the model on the CPU (else the replicas could not have started here)."""
    result = subprocess.run([sys.executable, str(Path(__file__).with_name("serve_on_gpus.py")),
                             str(run_dir)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    placed = json.loads(result.stdout.splitlines()[-1])
    assert placed["task_with_a_gpu"] == [[0], "cpu"] and placed["task_without"] == [[], "cpu"]
    assert placed["replica_states"] == {"RUNNING": 2, "STARTING": 1}
    assert placed["replica_actors"] == ["ALIVE", "ALIVE", "PENDING_CREATION"]
    assert placed["free"].get("GPU", 0) == 0 and placed["free"]["CPU"] >= 1


def test_a_dead_engine_or_replica_is_replaced_and_serving_goes_on(served, client):
    """Last in the module: it kills what the other tests use. An engine's process that
    dies fails its replica's health check, and Serve replaces the replica; a replica
    that dies takes its engine's process with it (the process sees its socket close)."""
    import ray

    def replicas() -> set[str]:
        return {actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
                if actor["name"].startswith("SERVE_REPLICA::raytron#ModelServer")}

    def engine_of(name: str) -> psutil.Process:
        pid = ray.get(ray.get_actor(name, namespace="serve").__ray_call__.remote(
            lambda _replica: __import__("os").getpid()))
        (engine,) = [child for child in psutil.Process(pid).children()
                     if "raytron.platform.serving.engine_main" in " ".join(child.cmdline())]
        return engine

    def replaced(victim: str) -> str:
        deadline = time.time() + 120
        while time.time() < deadline:
            for name in replicas() - {victim}:
                try:
                    if client.completions.create(model="small", prompt="a",
                                                 max_tokens=2).choices:
                        return name
                except Exception:  # routed to the dead one for a moment
                    pass
            time.sleep(1)
        pytest.fail(f"no replica replaced {victim} within 120 s")

    (first,) = replicas()
    engine_of(first).kill()
    second = replaced(first)
    engine = engine_of(second)
    ray.kill(ray.get_actor(second, namespace="serve"), no_restart=True)
    engine.wait(timeout=30)  # psutil.TimeoutExpired if it outlived its replica
    replaced(second)


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_an_imported_model_chats_in_its_own_template(served, tmp_path, family):
    """A Qwen3 folder with Qwen's template and a Llama 3.1-scaled folder with Llama 3.2's:
    /v1/chat/completions renders the conversation as transformers' apply_chat_template
    does, and answers what the model answers to that text; /tokenizer_info gives the
    template."""
    from ray import serve
    from test_chat import (
        LLAMA_3_2_SPECIAL,
        LLAMA_3_2_TEMPLATE,
        LLAMA_3_2_TOKENS,
        QWEN_2_5_SPECIAL,
        QWEN_2_5_TEMPLATE,
        QWEN_2_5_TOKENS,
    )
    from transformers import AutoTokenizer, LlamaConfig, Qwen3Config

    from raytron.platform.serving.app import build_app

    small = dict(vocab_size=576, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 initializer_range=0.1)
    if family == "qwen3":
        folder = hf_chat_model(tmp_path, Qwen3Config(**small, head_dim=32), QWEN_2_5_TEMPLATE,
                               QWEN_2_5_SPECIAL, QWEN_2_5_TOKENS)
    else:
        folder = hf_chat_model(tmp_path, LlamaConfig(**small, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}), LLAMA_3_2_TEMPLATE, LLAMA_3_2_SPECIAL,
            LLAMA_3_2_TOKENS)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    local = load_model(folder)
    prompt = render(messages, local.source.chat_template, add_generation_prompt=True)
    assert prompt == AutoTokenizer.from_pretrained(folder).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    expected = local.generate(prompt, 12, greedy=True)[0]
    serve.run(build_app(str(folder), family, api_key=KEY), name=family,
              route_prefix=f"/{family}")
    try:
        client = OpenAI(base_url=f"{served[1]}/{family}/v1", api_key=KEY, max_retries=0)
        response = client.chat.completions.create(model=family, messages=messages,
                                                  max_tokens=12, temperature=0)
        assert response.choices[0].message.content == expected.text
        request = urllib.request.Request(f"{served[1]}/{family}/tokenizer_info",
                                         headers={"Authorization": f"Bearer {KEY}"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            info = json.loads(answer.read())
        assert info["chat_template"] == local.source.chat_template.source
    finally:
        serve.delete(family)
