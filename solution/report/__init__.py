"""Results read and shown: folders (the one reader of run, soup, study and ensemble folders), table
(compare's table, markdown and curves PNG), significance (its paired-bootstrap columns), demo_scores
and demo_report (the demo's ``REPORT.md``)."""
