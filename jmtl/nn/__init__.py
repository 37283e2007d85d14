"""Flax NNX multi-task architectures.

Every model maps an input ``x`` to ``{task: prediction}`` (keys in sorted
order) and splits into ``encode(x) -> z`` (the shared representation, for
jmtl's features mode) and ``decode(z)``, with ``model(x) == decode(encode(x))``.
Trunks, experts, towers and heads are any NNX modules the user passes (MLPs,
convolutional nets, ...), called with one argument; dropout and batch norm
follow NNX's ``model.train()`` / ``model.eval()`` switches.

| model | paper |
| --- | --- |
| :class:`HardSharing` | Caruana 1993/1997 |
| :class:`SoftSharing`, :func:`soft_sharing_penalty` | Duong et al., ACL 2015 |
| :class:`CrossStitch`, :class:`CrossStitchUnit` | Misra et al., CVPR 2016 |
| :class:`MTAN`, :class:`AttentionMask` | Liu, Johns & Davison, CVPR 2019 |
| :class:`MMoE` | Ma et al., KDD 2018 |
| :class:`CGC`, :class:`PLE`, :class:`ExtractionLayer` | Tang et al., RecSys 2020 |
| :class:`PADNet`, :class:`MultiModalDistillation` | Xu et al., CVPR 2018 |
| :class:`DSelectK`, :class:`DSelectKGate` | Hazimeh et al., NeurIPS 2021 |
| :class:`LTB` (:meth:`LTB.fix` for the found tree) | Guo, Lee & Ulbricht, ICML 2020 |
| :class:`MTINet`, :class:`FeaturePropagation`, ... | Vandenhende et al., ECCV 2020 |

Requires ``flax>=0.12`` (``pip install jmtl[nn]``).
"""

try:
    import flax.nnx  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("jmtl.nn needs Flax >= 0.12: pip install 'jmtl[nn]'") from error

from jmtl.nn.cross_stitch import CrossStitch, CrossStitchUnit
from jmtl.nn.dselect_k import DSelectK, DSelectKGate, smooth_step
from jmtl.nn.experts import (
    CGC,
    PLE,
    ExtractionFeatures,
    ExtractionLayer,
    MixtureFeatures,
    MMoE,
)
from jmtl.nn.ltb import LTB, BranchLogits, BranchTemperature, BranchTree, gumbel_softmax
from jmtl.nn.mtan import MTAN, AttentionMask
from jmtl.nn.mtinet import (
    ConvBlock,
    FeaturePropagation,
    MTINet,
    MTINetOutput,
    SpatialAttentionDistillation,
    resize_to,
)
from jmtl.nn.padnet import MultiModalDistillation, PADNet, PADNetOutput
from jmtl.nn.sharing import HardSharing, SoftSharing, soft_sharing_penalty

__all__ = [
    "AttentionMask",
    "BranchLogits",
    "BranchTemperature",
    "BranchTree",
    "CGC",
    "ConvBlock",
    "CrossStitch",
    "CrossStitchUnit",
    "DSelectK",
    "DSelectKGate",
    "ExtractionFeatures",
    "ExtractionLayer",
    "FeaturePropagation",
    "HardSharing",
    "LTB",
    "MMoE",
    "MTAN",
    "MTINet",
    "MTINetOutput",
    "MixtureFeatures",
    "MultiModalDistillation",
    "PADNet",
    "PADNetOutput",
    "PLE",
    "SoftSharing",
    "SpatialAttentionDistillation",
    "gumbel_softmax",
    "resize_to",
    "smooth_step",
    "soft_sharing_penalty",
]
