"""Lookahead decoding: draft trees from n-grams, their costs, and shadow chains."""
