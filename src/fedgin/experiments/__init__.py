"""The comparison grid (scenarios x methods x seeds), its report and overlays, run reports and the demo."""
