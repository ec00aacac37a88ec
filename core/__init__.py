"""bitdet core: the contract the hardware and the host share.

The accelerator config and its presets (:mod:`bitdet.core.config`), the layer descriptor
(:mod:`bitdet.core.descriptor`), the command protocol (:mod:`bitdet.core.protocol`), bit
packing (:mod:`bitdet.core.packing`), the golden model (:mod:`bitdet.core.golden`),
threshold folding (:mod:`bitdet.core.fold`), the cycle model (:mod:`bitdet.core.cycles`)
and the deployment bundle (:mod:`bitdet.core.bundle`). Imports run one way: the
application (:mod:`bitdet.sw`) imports :mod:`bitdet.hw` and :mod:`bitdet.sim`, which import
this package; nothing here imports them.
"""
