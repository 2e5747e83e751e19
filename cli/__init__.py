"""The command line, `gradcam`: the layer on top. Each subcommand is one module that parses its flags, builds the
core's options, calls one function and prints a summary; the core (engine, export) never imports this package."""
