"""The one exception export raises for problems a user can fix; the command line prints it as a single line."""
from gradcam_engine.engine.errors import UserError


class ExportError(UserError):
    """A model, layer, head or output location that cannot be exported, with the reason and the fix."""

    # Raised while tracing the fused tf.function: tell AutoGraph not to rewrite it into a multi-line
    # "in user code:" message, so the command line can still print it as one line.
    ag_pass_through = True
