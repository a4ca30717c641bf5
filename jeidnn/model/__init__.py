"""The early-exit model's parts: backbone adapter, exit heads, gates, exit policies, layer-skipping
inference, costs.
"""
