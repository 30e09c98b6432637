"""The process the kill test SIGKILLs: it opens the agent, checks that it serves, then installs updates, serves
requests and queues samples in a loop, printing every queue id once ``enqueue`` has returned it (acknowledged).

Usage: python agent_kill_worker.py STATE_DIR BUNDLE_A BUNDLE_B SEED
"""

from __future__ import annotations

import sys

import numpy as np


def main() -> None:
    state_dir, bundle_a, bundle_b, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    from edgekit.agent import Agent, AgentConfig
    from edgekit.agent.probation import ProbationConfig

    agent = Agent.open(state_dir, AgentConfig(adapt_when="always", adapt_every=4, adapt_min_samples=4,
                                              probation=ProbationConfig(requests=3)))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
    out = agent.infer({"input": x})["output"]
    ok = out.shape == (1, 10) and bool(np.isfinite(out).all())
    print(f"READY {agent.status()['model']['version']} {'OK' if ok else 'BAD'}", flush=True)
    i = 0
    while True:
        i += 1
        agent.install(bundle_a if i % 2 else bundle_b, probation=bool(i % 3))
        for _ in range(4):
            agent.infer({"input": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)})
        qid = agent.state.enqueue(b"sample-%d" % i, {"i": i}, model=None, day="kill-test", budget=1 << 40)
        print(f"ACK {qid}", flush=True)


if __name__ == "__main__":
    main()
