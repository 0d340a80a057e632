"""UCI configuration: parse and write /etc/config/oe, typed schema, validation."""
