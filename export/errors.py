"""The one exception export raises for problems a user can fix; the CLI prints it as a single line."""


class ExportError(Exception):
    """A model, layer, head or output location that cannot be exported, with the reason and the fix."""
