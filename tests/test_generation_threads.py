"""One GemmaCausalLM serving several threads at once, as a web server would: every caller gets
the result it would have had alone."""

import threading

import numpy as np
import pytest
import test_generation
from conftest import BACKEND, to_numpy

text_lm = test_generation.text_lm  # the same fixture: a fresh tiny model for this module

# Mixed requests: one prompt or a batch, several prompt lengths and max_lengths, streams.
# One width bucket (16) and batches of 1 and 2 keep the compiled programs few.
REQUESTS = [
    ("generate", "the quick brown fox", 12),
    ("stream", "hello world", 14),
    ("generate", ["a", "one two three four five six"], 16),
    ("stream", "", 10),
    ("generate", "jumps over the lazy dog and runs", 16),
    ("generate", ["x y z", "lorem ipsum"], 13),
    ("stream", "one two three four five six seven", 16),
    ("generate", "dolor sit", 8),
]
THREADS = 4
REQUESTS_PER_THREAD = 5


def _run(lm, request):
    kind, prompt, max_length = request
    if kind == "stream":
        return "".join(lm.stream(prompt, max_length=max_length, stop_token_ids=None))
    return lm.generate(prompt, max_length=max_length, stop_token_ids=None)


def test_four_threads_get_the_results_of_serial_calls(text_lm):
    # Each thread its own mix, starting at a different request; the threads start together
    # on a fresh model, so they also race to compile the same programs.
    plans = [
        [REQUESTS[(start * 3 + k) % len(REQUESTS)] for k in range(REQUESTS_PER_THREAD)]
        for start in range(THREADS)
    ]
    results = [[None] * REQUESTS_PER_THREAD for _ in range(THREADS)]
    errors = []
    barrier = threading.Barrier(THREADS)

    def serve(thread):
        try:
            barrier.wait()
            for k, request in enumerate(plans[thread]):
                results[thread][k] = _run(text_lm, request)
        except Exception as error:  # reported below with the thread that raised it
            errors.append((thread, repr(error)))

    threads = [threading.Thread(target=serve, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    assert errors == []
    serial = {repr(request): _run(text_lm, request) for request in REQUESTS}
    for thread in range(THREADS):
        for k, request in enumerate(plans[thread]):
            assert results[thread][k] == serial[repr(request)], (thread, request)
    # The streams' text is generate's continuation (the tiny model rarely stops early).
    kind, prompt, max_length = REQUESTS[1]
    assert serial[repr(REQUESTS[1])] == text_lm.generate(
        prompt, max_length=max_length, stop_token_ids=None, strip_prompt=True)


@pytest.mark.skipif(BACKEND != "torch", reason="only torch's traced step writes caches in place")
def test_a_thread_tracing_its_step_leaves_another_threads_cache_alone(text_lm):
    """While one thread traces its decode step (which writes its own caches in place), an
    eager `call_with_cache` in another thread must still leave its caller's cache unchanged."""
    from keras_gemma.layers.kv_cache import cache_writes_in_place

    tracing, finished = threading.Event(), threading.Event()

    def trace():
        with cache_writes_in_place():
            tracing.set()
            finished.wait(60)

    tracer = threading.Thread(target=trace)
    tracer.start()
    tracing.wait(60)
    try:
        cache = text_lm.empty_cache(1, 16)
        text_lm.call_with_cache(np.array([[2, 40, 50]], "int32"), cache, 0)
        assert not np.any(to_numpy(cache))  # still the zeros it was made as
    finally:
        finished.set()
        tracer.join()
