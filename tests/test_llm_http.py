"""The OpenAI-compatible HTTP backend against a real HTTP server on loopback.

The server (http.server in a thread) answers in the chat-completions format; what it does
depends on a keyword in the prompt: well-formed, rambling, malformed answers, a first reply
slower than the client's timeout, a 500 then success, always 500, a body that is not JSON, a 429
with Retry-After. It counts requests per prompt itself, so the ``attempts`` the client reports are checked
against an independent count.
"""

import dataclasses
import json
import logging
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from soundstage.llm.backends import OpenAIChatEndpoint, chat_completions_url
from soundstage.llm.prompt import load_template

TIMEOUT = 2.0  # client timeout in these tests (generous: the test machine may be busy);
# SLOW replies take SLOW_SECONDS the first time
SLOW_SECONDS = 4.5

ANSWERS = {
    "WELL": 'ANSWER: ["guitar", "man"]',
    "RAMBLE": "Let me think step by step. The caption mentions dogs and a man in a park.\n"
    "1. dogs bark\n2. the man may talk\n3. the park is silent\n"
    '**Answer:**\n```json\n["Dogs", "man", "dog"]\n```',
    "MALFORMED": "I believe a guitar is being played, and maybe someone sings.",
    "NOTHING": "The scene is an empty room.\nANSWER: []",
    "SLOW": 'ANSWER: ["trumpet"]',
    "FLAKY": 'ANSWER: ["violins"]',
    "BUSY": 'ANSWER: ["cellos"]',
}
EXPECTED = {  # keyword -> (status, sources, attempts)
    "WELL": ("ok", ["guitar", "man"], 1),
    "RAMBLE": ("ok", ["dog", "man"], 1),
    "MALFORMED": ("unparseable", None, 1),
    "NOTHING": ("ok", [], 1),
    "SLOW": ("ok", ["trumpet"], 2),
    "FLAKY": ("ok", ["violin"], 2),
    "DOWN": ("error", None, 3),
    "BADBODY": ("error", None, 1),
    "BUSY": ("ok", ["cello"], 2),
}
KEYWORDS = list(EXPECTED)


class FakeLLMServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.requests = Counter()  # prompt text -> requests received
        self.bodies = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay = 0.0  # added to every reply (to observe concurrency)
        self.headers = []

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeLLMServer

    def log_message(self, *args):
        pass

    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        kind = next((k for k in KEYWORDS if k in prompt), "WELL")
        with srv.lock:
            srv.requests[prompt] += 1
            n = srv.requests[prompt]
            srv.bodies.append((self.path, body))
            srv.headers.append(dict(self.headers))
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
        try:
            time.sleep(srv.delay)
            if kind == "SLOW" and n == 1:
                time.sleep(SLOW_SECONDS)
            if kind == "DOWN" or (kind == "FLAKY" and n == 1):
                return self._send(500, b'{"error": "internal"}')
            if kind == "BADBODY":
                return self._send(200, b"<html>not json</html>")
            if kind == "BUSY" and n == 1:
                return self._send(429, b'{"error": "rate limited"}', {"Retry-After": "7"})
            reply = {
                "id": f"cmpl-{n}",
                "object": "chat.completion",
                "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": ANSWERS[kind]}}],
            }
            self._send(200, json.dumps(reply).encode())
        finally:
            with srv.lock:
                srv.in_flight -= 1

    def _send(self, code, payload, headers=None):
        try:
            self.send_response(code)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except OSError:  # the client gave up (timeout) and closed the connection
            pass


@pytest.fixture
def server():
    srv = FakeLLMServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def endpoint(srv, **kw):
    opts = dict(timeout=TIMEOUT, max_attempts=3, concurrency=4, backoff=0.01, max_new_tokens=64)
    opts.update(kw)
    return OpenAIChatEndpoint(srv.url, "fake-llm", **opts)


def test_url_forms():
    assert chat_completions_url("http://h:8000") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("http://h/x/v1/chat/completions") == "http://h/x/v1/chat/completions"


def test_every_reply_kind_and_attempts(server, caplog, monkeypatch):
    template = load_template()
    conversations = [template.messages([f"a caption {k}"]) for k in KEYWORDS]
    backend = endpoint(server, backoff_max=30)
    delays = []
    backend.sleep = delays.append  # record the backoff instead of waiting
    monkeypatch.setenv("SOUNDSTAGE_LLM_API_KEY", "secret-token")
    with caplog.at_level(logging.WARNING, logger="soundstage.llm"):
        answers = backend.generate(conversations)
    for kind, conv, answer in zip(KEYWORDS, conversations, answers):
        served = server.requests[conv[-1]["content"]]
        assert answer.attempts == served, kind  # the client's count is the server's count
        assert answer.attempts == EXPECTED[kind][2], kind
        if EXPECTED[kind][0] == "error":
            assert answer.text is None and answer.error
        else:
            assert answer.text == ANSWERS[kind]
    down = answers[KEYWORDS.index("DOWN")]
    assert "HTTP 500" in down.error and "3 attempts" in down.error
    assert "timed out" not in answers[KEYWORDS.index("SLOW")].error
    # retries are logged: SLOW once (timeout), FLAKY once, DOWN twice
    retries = [r.getMessage() for r in caplog.records if "attempt" in r.getMessage()]
    assert sum("timed out" in m for m in retries) == 1
    assert sum("HTTP 500" in m for m in retries) == 3
    # backoff: 0.01 s doubling, jitter within 25 %, and the 7 s the 429 asked for
    assert sorted(delays)[-1] == 7 and len(delays) == 5
    assert all(0.0075 <= d <= 0.025 for d in sorted(delays)[:-1])
    assert all(h.get("Authorization") == "Bearer secret-token" for h in server.headers)
    # the requests are chat completions, greedy, with the model name and the prompt
    path, body = server.bodies[0]
    assert path == "/v1/chat/completions"
    assert body["model"] == "fake-llm" and body["temperature"] == 0 and body["max_tokens"] == 64
    assert body["messages"][0]["role"] == "user"


def test_concurrency_is_bounded(server):
    server.delay = 0.05
    conversations = [[{"role": "user", "content": f"WELL {i}"}] for i in range(12)]
    answers = endpoint(server, concurrency=3).generate(conversations)
    assert [a.text for a in answers] == [ANSWERS["WELL"]] * 12  # order kept
    assert 1 <= server.max_in_flight <= 3


def test_connection_refused_is_retried_then_error():
    srv = FakeLLMServer()
    url = srv.url
    srv.server_close()  # nothing listens on the port any more
    answer = OpenAIChatEndpoint(url, "m", timeout=TIMEOUT, max_attempts=2, backoff=0.01).generate(
        [[{"role": "user", "content": "x"}]]
    )[0]
    assert answer.text is None and answer.attempts == 2 and "connection failed" in answer.error


# --- through the sources stage, the runner and the cache ---------------------------------

CLIPS = {  # clip id -> captions of its frames (one keyword per frame)
    "clip_a": ["a man with a guitar WELL", "dogs in a park RAMBLE", "a stage MALFORMED"],
    "clip_b": ["a trumpet SLOW", "an orchestra FLAKY", "a broken server DOWN"],
    "clip_c": ["an empty room NOTHING", "a bad proxy BADBODY", ""],
    "clip_d": ["", " "],  # nothing to ask about, not even for the whole clip
}


def _caption_stand_in():
    """The caption stage with its captions given by the test (no image model involved)."""
    from soundstage.stages import caption

    return dataclasses.replace(
        caption.STAGE,
        load=lambda row, ctx: CLIPS[row["clip_id"]],
        setup=None,
        process=lambda model, items, params: [{"captions": c} for c in items],
    )


def _manifest(tmp_path):
    path = tmp_path / "manifest.csv"
    path.write_text("clip_id,frames_dir,num_frames\n" + "".join(f"{c},frames/{c},{len(v)}\n" for c, v in CLIPS.items()))
    return str(path)


def _run_sources(tmp_path, server, **params):
    from soundstage.cache import open_stage
    from soundstage.pipeline.runner import run_stage
    from soundstage.stages import sources

    manifest, cache = _manifest(tmp_path), str(tmp_path / "cache")
    captioner_dir = tmp_path / "captioner"
    captioner_dir.mkdir(exist_ok=True)
    (captioner_dir / "config.json").write_text("{}")  # only its hash is read (fingerprint)
    run_stage(_caption_stand_in(), manifest, cache, {"model": str(captioner_dir)}, workers=0, progress=False)
    params = dict(llm="fake-llm", llm_endpoint=server.url, timeout=TIMEOUT, max_attempts=3, backoff=0.01, concurrency=4, **params)
    summary = run_stage(sources.STAGE, manifest, cache, params, workers=0, batch_size=2, progress=False)
    return summary, open_stage(summary.path)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # "fake-llm" is a served name, not a hub id


def test_sources_stage_stores_every_outcome(tmp_path, server, offline, caplog):
    vocabulary = tmp_path / "label2idx.json"
    vocabulary.write_text(json.dumps({"background": 1, "dog": 2, "guitar": 3, "man": 4, "violin": 5}))
    with caplog.at_level(logging.WARNING, logger="soundstage.llm"):
        summary, out = _run_sources(tmp_path, server, vocabulary=str(vocabulary), on_error="store")
    assert summary.ok and summary.done == 4
    assert any("unparseable" in note for _, note in summary.warnings)  # counted in the run summary
    for cid, captions in CLIPS.items():
        rec = out[cid]
        for i, caption in enumerate(captions):
            if not caption.strip():  # nothing to ask about: recorded, never sent
                assert (rec["status"][i], rec["attempts"][i], rec["sources"][i]) == ("error", 0, "null")
                assert "empty caption" in rec["detail"][i]
                continue
            kind = caption.rsplit(" ", 1)[1]
            status, names, attempts = EXPECTED[kind]
            assert rec["status"][i] == status, (cid, i)
            assert json.loads(rec["sources"][i]) == names, (cid, i)
            assert rec["attempts"][i] == attempts, (cid, i)
            assert rec["response"][i] == (ANSWERS.get(kind, "") if status != "error" else "")
            if status == "ok":  # vocabulary mapping beside the raw names
                mapped = [n if n in ("dog", "guitar", "man", "violin") else None for n in names]
                assert json.loads(rec["vocab_sources"][i]) == mapped, (cid, i)
                scores = json.loads(rec["vocab_scores"][i])
                assert [s == 1.0 for s in scores] == [m is not None for m in mapped]
            else:
                assert rec["vocab_sources"][i] == rec["vocab_scores"][i] == "null"
        # the clip-level question saw every caption of the clip
        assert rec["clip_status"] in ("ok", "unparseable", "error")
    assert json.loads(out["clip_a"]["clip_sources"]) == ["guitar", "man"]  # first keyword WELL
    # clip_b: SLOW is its first keyword, and the clip-level prompt is new to the server: slow once
    assert (json.loads(out["clip_b"]["clip_sources"]), out["clip_b"]["clip_attempts"]) == (["trumpet"], 2)
    assert json.loads(out["clip_c"]["clip_sources"]) == []
    assert (out["clip_d"]["clip_status"], out["clip_d"]["clip_attempts"]) == ("error", 0)
    assert any("needed retries" in r.getMessage() for r in caplog.records)
    # every request the server saw is counted in some stored attempts (clip_d's: none sent)
    assert sum(server.requests.values()) == sum(
        int(a) for rec in (out[c] for c in CLIPS) for a in list(rec["attempts"]) + [rec["clip_attempts"]]
    )


def test_sources_stage_on_error_fail_leaves_clip_for_rerun(tmp_path, server, offline):
    summary, out = _run_sources(tmp_path, server, on_error="fail")
    failed = dict(summary.failed)
    assert set(failed) == {"clip_b", "clip_c"}  # DOWN, BADBODY (an empty caption alone would not fail)
    assert "frame 2" in failed["clip_b"] and "HTTP 500" in failed["clip_b"]
    assert "frame 1" in failed["clip_c"] and "not a chat completion" in failed["clip_c"]
    assert "clip_b" not in out and json.loads(out["clip_a"]["sources"][0]) == ["guitar", "man"]
    assert list(out["clip_d"]["status"]) == ["error", "error"]  # stored: asking again would not help


def test_fail_mode_ignores_empty_captions():
    from soundstage.pipeline.stage import ClipError
    from soundstage.stages.sources import _fail_on_unanswered

    result = {
        "status": ["ok", "error"],
        "attempts": [1, 0],
        "detail": ["", "empty caption: nothing to ask about"],
        "clip_status": "ok",
        "clip_attempts": 1,
        "clip_detail": "",
    }
    _fail_on_unanswered(result, 2)  # never asked: asking again would not help
    result.update(clip_status="error", clip_attempts=3, clip_detail="HTTP 500")
    with pytest.raises(ClipError, match="clip-level question: HTTP 500"):
        _fail_on_unanswered(result, 2)


def test_retry_after_takes_seconds_and_http_dates():
    from soundstage.llm.backends import _seconds

    now = 1_700_000_000.0  # 2023-11-14T22:13:20Z
    assert _seconds("7") == 7.0
    assert _seconds("Tue, 14 Nov 2023 22:13:50 GMT", now=now) == 30.0  # the HTTP-date form
    assert _seconds("Tue, 14 Nov 2023 22:13:00 GMT", now=now) == 0.0  # already past
    assert _seconds("soon") == _seconds(None) == 0.0
