"""The exchanges of an IKE SA as task objects, one module per kind of exchange.

Why tasks (as charon's ``task_t``): each exchange owns what it needs across its
request and response (KE, nonces, SPIs, retries, collisions), so ``IkeSa`` keeps
only the queue, the window, the Child SA table and the events.
"""
