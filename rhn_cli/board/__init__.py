"""``rhn board``'s servers: Omniboard, installed with npm, and the local MongoDB-compatible
server it reads when no MongoDB is configured.

``process`` runs and watches the child processes; ``omniboard`` installs and starts
Omniboard; ``local_mongo`` starts SecantusDB; ``launch`` opens the board the command
shows. Nothing here records runs (that is :mod:`rhn_cli.tracking`, which this package
reads from); nothing imports it but :mod:`rhn_cli.commands.board`.
"""
