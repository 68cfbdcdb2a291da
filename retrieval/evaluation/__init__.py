"""Evaluation engine: revisitop/GLDv2 metrics, k-NN search, alphaQE/alphaDBA and re-ranking."""
