"""Model builders and data helpers for the interatomic potentials MMEA adapts."""
