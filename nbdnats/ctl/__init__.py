"""The control plane: agents, the controller, their events, policy and tools."""
