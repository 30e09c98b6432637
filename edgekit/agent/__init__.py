"""On-device side of edgekit. Imports without torch: devices may not have it.

``Agent.open(state_dir)`` → ``install(bundle)`` → ``infer(feeds)`` → ``status()``; see ``edgekit.agent.core``.
"""

from edgekit.agent.config import AgentConfig
from edgekit.agent.core import Agent

__all__ = ["Agent", "AgentConfig"]
