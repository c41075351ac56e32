"""Load test of the Serve app on this machine: throughput, latency, batching, autoscaling, a fault.

    python -m jobs.bench.serve [--score-duration-s 15] [--concurrency 1 8 32] [--generator PATH]
    python -m jobs.bench.serve --phases poison overload generator_kill   # the robustness phases only

Starts its own local Ray (loopback, no dashboard; or joins ``RAY_ADDRESS``) and deploys
``serve_app`` on 127.0.0.1 with a test config (scorer autoscaling 1 → 2 replicas at ½ CPU each,
short delays: :mod:`.deploy`). Then, with closed-loop HTTP clients (each sends its next request
when the last one answered; all traffic to 127.0.0.1, every loop bounded in time: :mod:`.client`),
the phases, each module's docstring says what it measures and its targets:

1. ``offline``: :meth:`Scorer.score` on all the request pairs in this process, before and after
   the /v1/score phases (:mod:`.phases.score`);
2. ``score``: ``/v1/score`` at each ``--concurrency``; target: served ÷ offline pairs/s ≥ 0.7
   (:mod:`.phases.score`);
3. ``select``: ``/v1/select`` at each ``--select-concurrency`` (:mod:`.phases.select`);
4. ``chat``: /v1/select, its /v1/chat/completions twin and the same chat streamed, back to back:
   same latency, same pick, and a stream's first content chunk against the plain latency
   (:mod:`.phases.chat`);
5. ``autoscaling``: Scorer replica counts from ``serve.status()`` sampled every ``--poll-s``
   through all phases (:mod:`.poller`), then after the load stops until it is back at
   ``min_replicas`` (:mod:`.phases.autoscaling`);
6. ``fault``: one of 2 Scorer replicas SIGKILLed under /v1/score load (:mod:`.phases.kills`);
7. ``poison``: issue 14's hostile requests, alone and among good ones, then normal traffic
   (:mod:`.phases.poison`);
8. ``overload``: far more /v1/select clients than the Generator admits: fast 503s with
   ``Retry-After`` (:mod:`.phases.overload`);
9. ``generator_kill``: one of 2 Generator replicas SIGKILLed under /v1/select load
   (:mod:`.phases.kills`).

``--phases`` runs a subset (default: all, in the order above; ``chat``, ``poison``, ``overload``
and ``generator_kill`` need no other phase). Every target of the phases run is checked
(:mod:`.targets`): the JSON line has ``targets`` (name → met) and ``failed_targets``; the exit
status is 1 when one is missed.

Pairs: validation instructions of a few BIG-Bench tasks with references of the same task as
responses when the BIG-Bench tasks are on this machine, else synthetic text of similar length
(:mod:`.payloads`). Generator: ``--generator`` or the embedded one if trained, else a tiny random
Llama (throughput only). Prints ONE JSON line with every figure. Timings on a shared 2-core
machine are noisy.
"""
