"""The agent's tier (b) adaptation, for devices that have torch: entropy minimization (TENT/EATA) of the norm layers'
per-channel corrections through an ONNX→torch interpreter. Kept outside ``edgekit.agent``, which imports no torch;
the agent reaches it lazily (``edgekit.agent.core.Agent._tent``) and goes on without it where torch is missing.
"""
