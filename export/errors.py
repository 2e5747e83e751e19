"""The one exception export raises for problems a user can fix; the CLI prints it as a single line."""


class ExportError(Exception):
    """A model, layer, head or output location that cannot be exported, with the reason and the fix."""

    # Raised while tracing the fused tf.function: tell AutoGraph not to rewrite it into a multi-line
    # "in user code:" message, so the CLI can still print it as one line.
    ag_pass_through = True
