"""Demo data and the small demo classifier that show Grad-CAM pointing at the right place."""
