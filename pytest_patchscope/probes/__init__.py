"""What a user writes to ask a question: probes, positions, decoding settings, mappings, presets.

Plain data with no model attached, and no torch at import time: a suite can build its probes
before any model is loaded. Resolving a probe against a model lives in ``engine/resolve.py``.
"""
