"""Jinja2 templates of the HTML report (packaged as amdet_gate.templates)."""
