"""Results read and shown: runs (the one reader of run, soup and study folders), compare (the table,
its markdown and the curves PNG), demo_report (``REPORT.md``)."""
