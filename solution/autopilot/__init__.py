"""From a competitor's data to the submission its evidence supports: recipe, stages, evidence, report."""
