"""Units of work composed by the flows: plan, decode, embed, commit, index, report."""
