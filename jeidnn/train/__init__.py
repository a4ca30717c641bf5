"""Training: stage 0 and the joint phase, the feature cache, the IM warm-up, stage 2 (learned gates),
devices.
"""
