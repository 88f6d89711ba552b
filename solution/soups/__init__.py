"""Checkpoint soups: ingredients, weight averaging, greedy/pairwise/uniform."""
