"""Checkpoint soups: ingredients, streamed weight averaging, scoring through retrieval, the
greedy/pairwise/uniform methods and a soup run; the names of a soup folder's files."""

from solution.formats.kinds import SOUP_LOG as LOG

SOUP, SUMMARY, CACHE, HITS = "soup.pt", "summary.json", "score_cache.json", "hits"
__all__ = ["CACHE", "HITS", "LOG", "SOUP", "SUMMARY"]
