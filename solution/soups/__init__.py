"""Checkpoint soups: ingredients, streamed weights and methods, scoring through retrieval, a soup run; the names
of a soup folder's files."""

from solution.formats.kinds import SOUP_LOG as LOG

SOUP, SUMMARY, HITS = "soup.pt", "summary.json", "hits"  # hits/: every candidate's per-query hits (the score cache)
__all__ = ["HITS", "LOG", "SOUP", "SUMMARY"]
