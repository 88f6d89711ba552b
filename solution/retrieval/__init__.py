"""Retrieval: encoding and scoring a model on a split, the image-feature cache, feature extraction, ranking and
submissions with their manifests, recall metrics and the official-exact evaluator."""
