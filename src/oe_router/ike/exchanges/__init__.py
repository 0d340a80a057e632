"""Exchange handlers of ``IkeSa``, one role per module."""
