"""A VLA-shaped robot policy and a closed-loop Meta-World benchmark (issue 10, item 6)."""
