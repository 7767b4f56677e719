"""What people read after a run: the session summary (``summary``), terminal lines, JSON,
Markdown and PNG heatmaps (``formats``) and the self-contained HTML page (``html``). No pytest.
"""
