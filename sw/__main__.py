"""``python -m bitdet.sw ...``: the ``bitdet`` command, for launchers that take a module.

``torchrun --standalone --nproc-per-node N -m bitdet.sw train ...`` trains with N processes
(docs/training.md, "Multi-process training"). ``-m bitdet`` cannot work: ``bitdet`` is a
namespace package assembled from ``core``, ``hw``, ``sim``, ``sw`` and ``configs``
(pyproject's ``package-dir``), with no folder of its own to hold a ``__main__``.
"""

from .cli import console_main

if __name__ == "__main__":
    console_main()
