"""What ``python -m fastpeft bench`` and ``python -m fastpeft report`` measure: ``timing`` times each layer beside
its references (``nn.Linear``, HF PEFT) and formats the tables; ``report`` sweeps sizes into a page with plots. The
library itself imports none of this; the command line imports it when a command runs."""
