"""Opportunistic encryption manager: policy groups, tunnels, shunts, idle teardown."""
