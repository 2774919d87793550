"""Pure PyTorch numerics: networks, integration rules, likelihoods.

Nothing in this subpackage imports scikit-learn; it takes and returns tensors.
"""
