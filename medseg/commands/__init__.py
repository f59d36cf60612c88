"""The sub-commands of ``medseg``, one module each; :mod:`medseg.cli` dispatches to their ``run(argv)``.

Each module imports only ``argparse`` and :mod:`medseg.commands.common` at the top and everything heavy (torch,
MONAI, Lightning) inside ``run``, after the arguments are parsed: ``--help`` and argument errors answer at once.
"""
