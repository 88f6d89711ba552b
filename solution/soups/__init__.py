"""Checkpoint soups: ingredients, streamed weights and methods, scoring through retrieval, a soup run; the names
of a soup folder's files."""

from solution.formats.kinds import SOUP_LOG as LOG

SOUP, SUMMARY, CACHE, HITS = "soup.pt", "summary.json", "score_cache.json", "hits"
__all__ = ["CACHE", "HITS", "LOG", "SOUP", "SUMMARY"]
