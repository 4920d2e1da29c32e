"""`python -m cachekd_cli ...` (and `torchrun -m cachekd_cli ...`) run the same CLI as `cachekd`."""

from cachekd_cli.entry import main

main()
