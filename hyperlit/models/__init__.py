"""Target architectures of the papers (plain and STN variants)."""
