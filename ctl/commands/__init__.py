"""agentctl's subcommand groups, one module each, registered in ``ctl.cli.COMMAND_GROUPS``."""
