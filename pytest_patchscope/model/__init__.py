"""The model: found and loaded (``loading``), described (``backend``: the family's layers and
logits; ``sites``: where a probe can read and write), and placed (``devices``: devices, dtypes,
device maps). Nothing here knows about probes or pytest.
"""
