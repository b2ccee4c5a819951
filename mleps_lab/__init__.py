"""The lab beside the mleps library: the paper's reproduction driver and its report, the MGS screen,
run summaries and the weight-signal analysis, and the per-step probes they install into MGS
(held-out diagnostics, oracle weights). Nothing in mleps/ imports this package."""
