"""Pictures and pages users look at: overlays, reconstructions, HTML galleries and reports."""
