"""torch.compile of the reference decode step on CPU (issue 10 item 6): a tiny model's cached decode steps, compiled,
give the eager logits; the ops appear as single nodes (their fake kernels), the graph breaks that remain are host-side
index building, listed in docs/architecture.md sec 6. aot_eager keeps the test fast (it traces through AOTAutograd and
the fake kernels like inductor does, without generating C++). Both backends: the native kernels are opaque ops too."""

from __future__ import annotations

import pytest
import torch

from dsv4 import kernels, ops
from dsv4.model.batch import ForwardBatch
from dsv4.model.cache import KVCache
from tests.conftest import make_tiny_config, random_model


def _batch(seq: list[int], a: int, b: int) -> ForwardBatch:
    return ForwardBatch(input_ids=torch.tensor(seq[a:b]), positions=torch.arange(a, b), start_pos=[a],
                        seq_lens=[b - a], slots=[0], block_tables=torch.arange(4)[None],
                        logits_indices=torch.arange(b - a))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_compiled_decode_step_equals_eager(backend):
    torch._dynamo.reset()
    cfg = make_tiny_config()
    model = random_model(cfg)
    seq = torch.randint(0, cfg.vocab_size, (24,), generator=torch.Generator().manual_seed(2)).tolist()
    caches = [KVCache(cfg, num_slots=1, num_pages=4, page_size=16, dtype=torch.float32) for _ in range(2)]
    step = torch.compile(model.forward_batch, backend="aot_eager")
    if backend == "native" and not kernels.available():
        pytest.skip(f"native backend not run: {kernels.why_unavailable()}")
    with torch.no_grad(), ops.use_backend("cpu", backend):
        for cache in caches:
            model.forward_batch(_batch(seq, 0, 20), cache)
        for p in (20, 21):  # decode steps: eager on one cache, compiled on the other
            want = model.forward_batch(_batch(seq, p, p + 1), caches[0]).logits
            got = step(_batch(seq, p, p + 1), caches[1]).logits
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        explain = torch._dynamo.explain(model.forward_batch)(_batch(seq, 22, 23), caches[1])
    # one break remains: _check_cache reading the block table's values (a host-side guard before the layers)
    where = [(r.user_stack[-1].filename.rsplit("/", 1)[-1], r.user_stack[-1].name) for r in explain.break_reasons]
    assert explain.graph_break_count <= 1 and set(where) <= {("transformer.py", "_check_cache")}, where
    print(f"graphs {explain.graph_count}, breaks {explain.graph_break_count}:",
          sorted({(r.user_stack[-1].filename.rsplit('/', 1)[-1], r.user_stack[-1].lineno, r.reason.splitlines()[0])
                  for r in explain.break_reasons if r.user_stack}))
