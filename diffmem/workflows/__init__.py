"""Workflows built on the diffmem library: the demo, the audit, mitigation and the HTML report."""
