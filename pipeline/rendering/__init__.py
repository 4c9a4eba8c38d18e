"""Reports as documents (Jinja2 templates: Markdown and HTML) and figures (matplotlib)."""
