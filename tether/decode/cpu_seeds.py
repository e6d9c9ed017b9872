"""Seeded requests on vLLM's CPU engine: a discarded sample must not kill the engine.

vLLM samples a row for every scheduled request, then discards the sample of a request whose
prompt is still being prefilled in chunks. For a request with its own ``seed`` it then rewinds
that request's generator (``gen.set_offset(gen.get_offset() - 4)`` in
``GPUModelRunner._bookkeeping_sync``), so that the discarded draw leaves no trace in the seeded
output. A CPU ``torch.Generator`` (Mersenne Twister) has no offset: the call raises "CPU
Generator does not use offset", the engine core dies, and every request on the server fails
with it. One client's ``seed`` on a long prompt (measured: 4 concurrent seeded chat requests of
about 1,500 tokens with ``--max-num-batched-tokens 512``) was enough.

The same rewind, done the CPU way: before sampling, the state of every discarded request's CPU
generator is saved (``get_state``); during the bookkeeping those generators are held out of the
batch's table, so vLLM's loop skips them, and afterwards each gets its saved state back. A
seeded output is then the same however its prompt was chunked, as vLLM intends on GPUs.

Written for vLLM 0.32 (``CPUModelRunner`` inherits ``sample_tokens`` and ``_bookkeeping_sync``
from ``GPUModelRunner``); ``install`` refuses versions outside ``engine.SUPPORTED_VLLM``.
"""

from __future__ import annotations

import numpy as np


def _discarded_cpu_generators(runner) -> dict:
    """Batch index -> CPU generator of every request whose sample this step discards."""
    n = runner.input_batch.num_reqs
    generators = runner.input_batch.generators
    held = {}
    for i in np.nonzero(runner.discard_request_mask.np[:n])[0]:
        gen = generators.get(int(i))
        if gen is not None and gen.device.type == "cpu":
            held[int(i)] = gen
    return held


def install() -> None:
    """Patch vLLM's ``CPUModelRunner`` (once per process)."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    from tether.decode.engine import check_vllm_version

    check_vllm_version()
    if getattr(CPUModelRunner, "_tether_cpu_seeds", False):
        return
    sample_tokens, bookkeeping = CPUModelRunner.sample_tokens, CPUModelRunner._bookkeeping_sync

    def sample_tokens_saving_states(self, *args, **kwargs):
        # _bookkeeping_sync runs inside sample_tokens, after the sampler has drawn
        self._tether_saved_states = {i: gen.get_state()
                                     for i, gen in _discarded_cpu_generators(self).items()}
        try:
            return sample_tokens(self, *args, **kwargs)
        finally:
            self._tether_saved_states = {}

    def bookkeeping_restoring_states(self, *args, **kwargs):
        generators = self.input_batch.generators
        held = {i: generators.pop(i) for i in self._tether_saved_states}
        try:
            return bookkeeping(self, *args, **kwargs)
        finally:
            for i, gen in held.items():
                gen.set_state(self._tether_saved_states[i])
                generators[i] = gen

    CPUModelRunner.sample_tokens = sample_tokens_saving_states
    CPUModelRunner._bookkeeping_sync = bookkeeping_restoring_states
    CPUModelRunner._tether_cpu_seeds = True
