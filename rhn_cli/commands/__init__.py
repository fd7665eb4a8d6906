"""Click command groups that live in their own modules, registered on ``rhn`` by
:mod:`rhn_cli.cli`. Parsing and printing only; the work is done in the layers below."""
