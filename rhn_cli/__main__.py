from rhn_cli.cli import main

main()
