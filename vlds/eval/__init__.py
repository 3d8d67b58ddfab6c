"""Task metrics and distributed evaluation."""
