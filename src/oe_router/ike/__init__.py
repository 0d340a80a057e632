"""IKEv2 (RFC 7296): wire codec, key schedule, authentication, sans-IO SA state machines."""
