"""Coverage-guided fuzzing (atheris/libFuzzer) of the daemon's parsers and protocol cores.

``python -m fuzz.run`` runs targets (``fuzz/targets/<name>.py``) over their seed corpora
(``fuzz/corpus/<name>/``); ``python -m fuzz.seeds`` regenerates those seeds. See docs/fuzzing.md.
"""
