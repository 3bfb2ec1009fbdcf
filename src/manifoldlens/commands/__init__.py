"""The work of the ``manifoldlens`` commands, one module per command group, named after what
the user types: :mod:`.classifier` (``train``, ``spectrum``, ``gram``), :mod:`.leaf`
(``leaf …``), :mod:`.flow` (``flow …``), :mod:`.manifold` (``manifold …``), :mod:`.ood`
(``ood``) and :mod:`.demo` (``demo``); :mod:`.common` holds what they share.

Each module has ``run_*`` functions, usable from Python, that take a
:class:`~manifoldlens.runs.Run`, compute, write figures, arrays and metrics into it and
return the metrics; their signatures hold the defaults. ``add_arguments(subparsers)``
registers the module's subcommands, each bound to a handler ``(args, run)`` that calls a
``run_*`` function. :mod:`manifoldlens.cli` lists the modules, opens the run and dispatches.
"""
