"""Reading runs, soups and studies; comparison tables, plots and the demo report."""
