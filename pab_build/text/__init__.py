"""Text rules: the subject filter and its WordNet access."""
