"""Pruning methods: magnitude, Wanda, SparseGPT, DSnoT (unstructured and N:M), with OWL layer-wise ratios."""
