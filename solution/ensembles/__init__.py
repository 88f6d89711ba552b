"""Score-level ensembles: members of any architecture fused by normalised, weighted scores."""
