"""Reporting: the targets judged from the measurements, the Markdown table and the PNG chart."""
