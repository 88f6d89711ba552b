"""Encoding, ranking, recall metrics, the official evaluator; fusion and significance."""
