"""ctypes binding of /dev/crypto (cryptodev-linux, OCF ioctls)."""
