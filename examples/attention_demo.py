"""Pioneer as a library: the six demos (basic, hybrid, streaming, cache, direct orchestrator, interactive).

Run: python examples/attention_demo.py [basic|hybrid|streaming|cache|orchestrator|interactive|all]
Uses MODEL_PATH (or trains the default model on first use) and, for hybrid, OPENAI_API_KEY / OPENAI_BASE_URL.
"""

import asyncio
import sys
import time

from worker.orchestrator import (
    ChatMessage,
    attention_orchestrator,
    get_attention_info,
    handle_attention_message,
    handle_hybrid_message,
    handle_stream_attention_message,
)


async def basic():
    result = await handle_attention_message("demo-user", "Hello! How are you?")
    print(f"[basic] {result['reply']!r} (method {result['meta']['method']}, "
          f"confidence {result['meta']['confidence']:.2f})")


async def hybrid():
    for text in ("good morning", "Write a Python function that merges two sorted lists."):
        result = await handle_hybrid_message("demo-user", text)
        meta = result["meta"]
        print(f"[hybrid] {text!r} -> {meta['method']} ({meta['route']}"
              f"{', fell back: ' + meta['fallback'] if meta['fallback'] else ''}): {result['reply'][:80]!r}")


async def streaming():
    print("[streaming] ", end="", flush=True)
    async for chunk in handle_stream_attention_message("demo-user", "tell me about yourself", mode="local"):
        print(chunk, end="", flush=True)
    print()


async def cache():
    messages = [ChatMessage("user", "what is your favourite colour?")]
    timings = []
    for _ in range(2):
        started = time.perf_counter()
        result = await attention_orchestrator.get().complete(messages, "local")
        timings.append((time.perf_counter() - started) * 1000)
    print(f"[cache] first {timings[0]:.1f} ms, repeated {timings[1]:.1f} ms (cached: {result.meta.cached}); "
          f"stats {get_attention_info()['cache']}")


async def orchestrator():
    result = await attention_orchestrator.process_messages(
        [ChatMessage("system", "You are a cheerful assistant."), ChatMessage("user", "Hi there!")])
    print(f"[orchestrator] content={result.content!r} method={result.method} confidence={result.confidence}")
    info = get_attention_info()
    print(f"[orchestrator] mode={info['attention_mode']} parameters={info['model_parameters']:,} "
          f"device={info['device']} cache_enabled={info['cache_enabled']} openai={info['openai']}")


async def interactive():
    print("[interactive] type a message (empty line to stop)")
    while True:
        text = await asyncio.to_thread(input, "you> ")
        if not text.strip():
            return
        result = await handle_hybrid_message("demo-user", text)
        print(f"pioneer> {result['reply']}  [{result['meta']['method']}]")


DEMOS = {"basic": basic, "hybrid": hybrid, "streaming": streaming, "cache": cache, "orchestrator": orchestrator,
         "interactive": interactive}


async def main(names):
    for name in names:
        await DEMOS[name]()


if __name__ == "__main__":
    chosen = sys.argv[1:] or ["all"]
    asyncio.run(main([n for n in DEMOS if n != "interactive"] if chosen == ["all"] else chosen))
