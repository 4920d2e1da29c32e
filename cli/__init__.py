"""The `cachekd` command line (installed as the import package ``cachekd_cli``)."""
