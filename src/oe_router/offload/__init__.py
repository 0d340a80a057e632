"""Crypto engines (AF_ALG, cryptodev, software): discovery, known-answer tests, measurement."""
