"""The Ray Serve application against the official `openai` client, on 127.0.0.1: greedy
text equals raytron's own generation, bad requests get a 400 and the server goes on, the
API key is enforced, and concurrent requests decode together with the same results."""

import concurrent.futures
import json
import socket
import urllib.error
import urllib.request

import pytest
from openai import AuthenticationError, BadRequestError, OpenAI

from raytron.pipelines.chat import render
from raytron.platform.models import load_model

from model_runs import run_cli, small_model, small_tokenizer, write_run

KEY = "test-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    from ray import serve

    from raytron.platform.serving.app import build_app

    run_dir = write_run(tmp_path_factory.mktemp("runs"), "served",
                        small_model(512, max_seq_len=128), small_tokenizer())
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(str(run_dir), "small", api_key=KEY), name="raytron", route_prefix="/")
    yield run_dir, f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def client(served) -> OpenAI:
    return OpenAI(base_url=served[1] + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def local(served):
    return load_model(served[0])


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


@pytest.mark.parametrize("request_body", [
    {"model": "other", "prompt": "a"},
    {"model": "small", "prompt": ""},
    {"model": "small", "prompt": "a", "temperature": -1},
    {"model": "small", "prompt": "a", "max_tokens": 128},
    {"model": "small", "prompt": "word " * 200},
    {"model": "small", "prompt": "a", "stop": [""]},
])
def test_a_bad_request_gets_400_and_the_server_goes_on(client, request_body):
    with pytest.raises(BadRequestError) as refused:
        client.completions.create(**request_body)
    assert refused.value.status_code == 400
    assert refused.value.body["type"] == "invalid_request_error"
    assert client.completions.create(model="small", prompt="a", max_tokens=2).choices


def test_invalid_json_gets_400_and_the_key_is_enforced(served, client):
    base = served[1]
    request = urllib.request.Request(base + "/v1/completions", data=b"{not json",
                                     headers={"Authorization": f"Bearer {KEY}"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 400
    assert "error" in json.loads(refused.value.read())
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in client.models.list().data] == ["small"]
    with urllib.request.urlopen(base + "/health", timeout=30) as health:
        assert health.status == 200


def test_concurrent_requests_decode_together_and_give_what_each_gives_alone(client, local):
    prompts = [f"def f{i}(x):" for i in range(12)]

    def complete(prompt: str) -> str:
        return client.completions.create(model="small", prompt=prompt, max_tokens=10,
                                         temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        texts = list(pool.map(complete, prompts))
    assert texts == [g.text for g in local.generate(prompts, 10, greedy=True, batch_size=1)]


def test_raytron_serve_runs_in_the_foreground_and_stops_on_ctrl_c(served, tmp_path):
    import queue
    import signal
    import subprocess
    import sys
    import threading

    code, _, err = run_cli("serve", str(tmp_path), "--port", "1")
    assert code == 2 and "is no model" in err  # refused before Ray starts
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "raytron.platform.cli", "serve",
                                str(served[0]), "--name", "cli", "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout],
                     daemon=True).start()
    output = []
    try:
        while not output or "Ctrl-C stops it" not in output[-1]:
            output.append(lines.get(timeout=180))  # the command says when it is ready
        cli = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert cli.completions.create(model="cli", prompt="A class", max_tokens=4).choices
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
    assert process.returncode == 0, "".join(output)
    assert any(f"at http://127.0.0.1:{port}/v1" in line for line in output)
