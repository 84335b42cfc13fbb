"""twotower: a serving system for two-tower block-diffusion language models.

Layers, bottom up: kernels, protos, decoding -> towers -> cluster (engine -> actors -> ingress / serve
-> cli); models holds the bundled checkpoint. The public in-process API is `twotower.cluster`.
"""
