"""The names of the dynamic forms, in one place: the exporters build them, the recipes offer
them, the manifest schema accepts them (docs/design.md §3).

Gated networks: ``mask`` (every block computed, the baseline), ``if`` (an ``If`` per block on
"any sample executes"), ``compact`` (the executing rows gathered, run, scattered back),
``staged`` (one graph per piece, the host routes rows), ``loop`` (one ``Loop`` per run of like
blocks over stacked weights). Early exits: ``mask``, ``if`` (nested) and ``staged``.
"""

GATED_FORMS = ("mask", "if", "compact", "staged", "loop")
EXIT_FORMS = ("mask", "if", "staged")
