"""Reading run, soup, study and ensemble folders (folders), compare's table, markdown and plot (table), its
paired-bootstrap columns (significance), and the failure browser (failures)."""
