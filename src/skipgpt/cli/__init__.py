"""The `skipgpt` command line: one module per subcommand."""
