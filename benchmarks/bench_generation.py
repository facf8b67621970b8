"""Sources-stage LLM throughput: batched generation (left padding) against one prompt at a time,
on the same model and prompts, and the HTTP backend's concurrency against a loopback server.

The local model is a small random Llama built from a config (no download; the words are
nonsense but the compute is real), loaded through from_pretrained like a real checkpoint. Both
modes decode greedily, so their answers must be identical; the script checks it.

    python benchmarks/bench_generation.py [--prompts 32] [--hidden 256] [--layers 4] [--new-tokens 32]
"""

import argparse
import os
import platform
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from _text_models import CAPTION_WORDS, build_chat_lm  # noqa: E402

from soundstage.llm.backends import OpenAIChatEndpoint, TransformersChatLM  # noqa: E402
from soundstage.llm.prompt import load_template  # noqa: E402


def captions(n: int, seed: int = 0) -> list[str]:
    """Captions of 4 to 20 words, so batches hold prompts of different lengths (padding matters)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(4, 21, (1,), generator=g))
        out.append(" ".join(CAPTION_WORDS[int(i)] for i in torch.randint(len(CAPTION_WORDS), (length,), generator=g)))
    return out


def time_local(model_dir: str, conversations: list, batch_size: int, new_tokens: int):
    lm = TransformersChatLM(model_dir, device="cpu", dtype="fp32", max_new_tokens=new_tokens, batch_size=batch_size)
    lm.generate(conversations[:2])  # warm-up
    start = time.perf_counter()
    answers = lm.generate(conversations)
    return time.perf_counter() - start, [a.text for a in answers]


def time_http(conversations: list, concurrency: int, delay: float) -> float:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from test_llm_http import FakeLLMServer  # the tests' loopback server, here with a fixed latency

    server = FakeLLMServer()
    server.delay = delay
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        backend = OpenAIChatEndpoint(server.url, "bench", concurrency=concurrency, timeout=30)
        start = time.perf_counter()
        answers = backend.generate(conversations)
        assert all(a.text for a in answers)
        return time.perf_counter() - start
    finally:
        server.shutdown()
        server.server_close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--http-delay", type=float, default=0.2, help="server latency per request (s)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    template = load_template()
    conversations = [template.messages([c]) for c in captions(args.prompts)]
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads; "
        f"{args.prompts} prompts, Llama hidden {args.hidden} x {args.layers} layers, {args.new_tokens} new tokens"
    )
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_chat_lm(os.path.join(tmp, "lm"), hidden=args.hidden, layers=args.layers, heads=4)
        probe = TransformersChatLM(model_dir)
        lengths = [len(t) for t in probe.tokenizer(probe.prompt_texts(conversations), add_special_tokens=False)["input_ids"]]
        print(f"prompt lengths {min(lengths)}..{max(lengths)} tokens")
        single, reference = time_local(model_dir, conversations, 1, args.new_tokens)
        print(f"one prompt at a time : {single:7.2f} s  ({args.prompts / single:6.2f} prompts/s)")
        for bs in args.batch_sizes:
            seconds, texts = time_local(model_dir, conversations, bs, args.new_tokens)
            same = sum(a == b for a, b in zip(texts, reference))
            print(
                f"batched, {bs:3d} / call   : {seconds:7.2f} s  ({args.prompts / seconds:6.2f} prompts/s)  "
                f"speed-up x{single / seconds:5.2f}; identical answers {same}/{args.prompts}"
            )

    for concurrency in (1, 8):
        seconds = time_http(conversations, concurrency, args.http_delay)
        print(
            f"HTTP, {args.http_delay:.2f} s latency, concurrency {concurrency}: {seconds:6.2f} s "
            f"({args.prompts / seconds:6.2f} prompts/s)"
        )


if __name__ == "__main__":
    main()
