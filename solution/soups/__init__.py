"""Checkpoint soups: ingredients, streamed weight averaging, scoring through retrieval, the
greedy/pairwise/uniform methods and a soup run."""
