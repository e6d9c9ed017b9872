r"""One result assembly: from a finished SMC population to its outputs, weights and draws.

The Python API (``decode.llm``) and the server (``decode.server``) both call ``assemble``; they
differ only in how they present what it returns (``Result`` objects, or OpenAI choices with a
``tether`` field).

For a population of N particles with final log weights \log w_i (the sum of the AWRS step
log weights since the last resampling; -inf for an output that is not complete and valid:
``length``, ``constraint``) the posterior over complete outputs is
\hat\pi(y_i) = w_i / \sum_j w_j, and the estimate of the constrained mass is
\log \hat Z = \sum_{resamplings} \log \mathrm{mean}(w) + \log \mathrm{mean}_i(w_i)
(-inf when no particle completed). The ``n`` draws are taken from \hat\pi with the
population's own generator (so a seeded run repeats itself).

What a caller shows when there is no posterior (``choices``): every final weight is zero (no
particle completed): the particles with the highest log weight first, then the longest, never
labelled ``stop``; a particle failed (``budget`` or ``error``): its weight is unknown, so there
is no posterior and no log Z at all, and the failed particle comes first so that the failure
is what the caller sees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from tether.decode.records import ParticleRecord
from tether.samplers import resampling

ENDED = ("constraint", "budget", "error")  # reasons that make a particle's weight -inf


@dataclass
class ParticleOutput:
    """One particle: its output and its weight (``stats`` as ``ParticleRecord.summary``)."""

    uid: int
    parent: int | None
    tokens: list[int]
    text: str
    finish_reason: str  # stop | length | constraint | budget | error
    log_weight: float  # of the whole output; -inf for constraint, budget, error
    value: Any  # the parsed output when finish_reason is "stop", else None
    stats: dict
    engine: int | None  # data-parallel rank of the engine that ran its last request
    failure: dict | None
    normalized_weight: float | None = None


@dataclass
class Population:
    """A finished population (one prompt's particles), with its posterior."""

    particles: list[ParticleOutput]
    draws: list[int]  # indices of the posterior draws (empty: no posterior)
    log_z: float | None  # None when a particle failed (its weight is unknown)
    failure: dict | None
    resampling: list[dict]  # events: time, ess, ancestors, clones, prefill_tokens
    stats: dict = field(default_factory=dict)  # totals over every particle

    def choices(self, n: int) -> list[int]:
        """``n`` particle indices to show: the posterior draws, else the rule in the module
        docstring (failed particle first; else best weight, then longest)."""
        if self.draws:
            return list(self.draws[:n])
        order = sorted(range(len(self.particles)), key=lambda i: (
            self.particles[i].failure is None, -self.particles[i].log_weight,
            -len(self.particles[i].tokens)))
        return (order * n)[:n]


def assemble(group: Any, draws: int, decode: Callable[[list[int]], str],
             constrained: bool = True) -> Population:
    """The population of ``group`` (``decode.smc.Group``) with ``draws`` posterior draws;
    ``decode`` turns a particle's tokens (stop tokens removed) into its text."""
    stop_ids = group.constraint.eos_token_ids if group.constraint is not None else frozenset()
    outputs = [_particle(group, p, decode, stop_ids, constrained) for p in group.particles]
    failure = group.failure
    totals = {"checks": sum(o.stats.get("checks", 0) for o in outputs),
              "tokens": sum(o.stats.get("tokens", 0) for o in outputs),
              "rejections": sum(o.stats.get("rejections", 0) for o in outputs),
              "weights": next((o.stats["weights"] for o in outputs if o.stats.get("weights")),
                              None),
              "dead_particles": sum(o.finish_reason == "constraint" for o in outputs),
              "resampling_events": len(group.resamples),
              "copies": sum(len(e["clones"]) for e in group.resamples),
              "copy_prefill_tokens": sum(e.get("prefill_tokens", 0) for e in group.resamples)}
    if failure is not None:  # weights unknown: no posterior, no estimate
        return Population(outputs, [], None, failure, group.resamples, totals)
    final = np.array([p.log_weight(group.last_resample) if o.finish_reason == "stop"
                      else -math.inf for p, o in zip(group.particles, outputs)])
    if not np.isfinite(final).any():  # nothing complete: every normalized weight is zero
        for o in outputs:
            o.normalized_weight = 0.0
        return Population(outputs, [], -math.inf, None, group.resamples, totals)
    weights = resampling.normalize(final)
    for o, w in zip(outputs, weights):
        o.normalized_weight = float(w)
    log_z = group.log_z + resampling.log_mean_exp(final)
    picks = [0] * draws if len(outputs) == 1 else \
        [int(i) for i in group.rng.choice(len(outputs), size=draws, p=weights)]
    return Population(outputs, picks, log_z, None, group.resamples, totals)


def _particle(group: Any, particle: Any, decode: Callable, stop_ids: frozenset,
              constrained: bool) -> ParticleOutput:
    text = decode([t for t in particle.tokens if t not in stop_ids])
    finish = particle.finish_reason or "length"
    if not constrained:
        return ParticleOutput(particle.uid, particle.parent, list(particle.tokens), text,
                              finish, 0.0, None, {}, particle.engine, particle.failure)
    record = ParticleRecord("", {i: s for i, s in enumerate(particle.steps) if s is not None},
                            failure=particle.failure, weights=particle.weights)
    stats = record.summary(len(particle.tokens))
    del stats["key"]
    stats["dead"] = finish == "constraint"
    if finish in ENDED:
        stats["log_weight"] = -math.inf
    value = group.constraint.parse(text) if finish == "stop" else None
    return ParticleOutput(particle.uid, particle.parent, list(particle.tokens), text, finish,
                          stats["log_weight"], value, stats, particle.engine, particle.failure)
