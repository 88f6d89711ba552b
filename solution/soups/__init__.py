"""Checkpoint soups: ingredients, streamed weight averaging, scoring through retrieval, the
greedy/pairwise/uniform methods and a soup run; the names of a soup folder's files."""

SOUP, LOG, SUMMARY, CACHE, HITS = "soup.pt", "soup_log.jsonl", "summary.json", "score_cache.json", "hits"
